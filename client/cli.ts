// The opa-backup command line.
//
// Exit codes: 0 success; 1 the backup or command failed; 2 invalid usage or
// an invalid plan (nothing was started); 3 the backup is partial (some
// sources failed, the others are stored); for verify, 4 a stored object is
// damaged and 5 an object cannot be read here (see client/verify.ts); for
// drill, 6 a check failed (see client/drill.ts); 75 another backup (or
// retention run) of the plan is running. For status, 6 means a check is
// stale (see client/status.ts).
import { Command, CommanderError, Option } from 'commander';
import { Connection, Client, WorkflowExecutionAlreadyStartedError, WorkflowFailedError, type WorkflowHandle } from '@temporalio/client';
import { loadPlanFile, PlanError } from '../activities/plan-loader';
import { temporalSettings } from '../common/config';
import { planWorkflowId, type Plan } from '../common/plan';
import type { BackupProgress, BackupWorkflowResult } from '../common/workflow-types';
import { listBackups, formatBytes } from './backups';
import { addDoctorCommand } from './doctor';
import { addDrillCommand } from './drill';
import { addRetentionCommand } from './retention';
import { addScheduleCommands, EXIT_BUSY, warnWithoutWorker } from './schedules';
import { addVerifyCommands } from './verify';
import { addStatusCommand } from './status';

export const EXIT_OK = 0;
export const EXIT_FAILED = 1;
export const EXIT_USAGE = 2;
export const EXIT_PARTIAL = 3;

class ExitError extends Error {
  constructor(message: string, readonly exitCode: number) {
    super(message);
  }
}

/** Loads a plan and checks its secret references, or exits with the plan's problems. */
function loadCheckedPlan(file: string, checkSecrets: boolean): Plan {
  try {
    return loadPlanFile(file, { checkReferences: checkSecrets });
  } catch (error) {
    if (error instanceof PlanError) throw new ExitError(`invalid plan:\n${error.message}`, EXIT_USAGE);
    throw error;
  }
}

async function connectClient(): Promise<{ client: Client; connection: Connection; taskQueue: string }> {
  const settings = temporalSettings();
  let connection: Connection;
  try {
    connection = await Connection.connect({ address: settings.address, connectTimeout: '5s' });
  } catch (error) {
    throw new ExitError(
      `cannot connect to Temporal at ${settings.address}: ${(error as Error).message}; start a server or set TEMPORAL_ADDRESS`,
      EXIT_FAILED,
    );
  }
  return { client: new Client({ connection, namespace: settings.namespace }), connection, taskQueue: settings.taskQueue };
}

/** Returns the message of the innermost cause: for a failed workflow, the activity's own error. */
function rootMessage(error: unknown): string {
  let current = error as { message?: string; cause?: unknown } | undefined;
  while (current && current.cause && typeof current.cause === 'object') {
    current = current.cause as { message?: string; cause?: unknown };
  }
  return current?.message ?? String(error);
}

interface PendingActivity {
  activityId?: string | null;
  attempt?: number | null;
  lastFailure?: { message?: string | null } | null;
  heartbeatDetails?: { payloads?: Array<{ metadata?: Record<string, Uint8Array> | null; data?: Uint8Array | null }> | null } | null;
}

/** Decodes the first heartbeat detail of an activity when it is JSON, as the worker's default converter writes it. */
function heartbeatDetail(activity: PendingActivity): Record<string, unknown> | undefined {
  const payload = activity.heartbeatDetails?.payloads?.[0];
  const encoding = payload?.metadata?.encoding ? Buffer.from(payload.metadata.encoding).toString('utf8') : undefined;
  if (!payload?.data || encoding !== 'json/plain') return undefined;
  try {
    const value = JSON.parse(Buffer.from(payload.data).toString('utf8')) as unknown;
    return value && typeof value === 'object' && !Array.isArray(value) ? (value as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Formats an activity's heartbeat as a progress line: its phase, byte
 * counts and item counts, such as "dump, 120.5 MB written, 12 tables".
 */
export function formatHeartbeat(detail: Record<string, unknown>): string | undefined {
  const parts: string[] = [];
  if (typeof detail.phase === 'string') parts.push(detail.phase);
  const byteFields: Array<[string, string]> = [
    ['dataBytes', 'data read'],
    ['uploadedBytes', 'stored'],
    ['bytes', 'written'],
  ];
  for (const [field, label] of byteFields) {
    const value = detail[field];
    if (typeof value === 'number' && value > 0) parts.push(`${formatBytes(value)} ${label}`);
  }
  for (const field of ['tables', 'keys', 'records', 'checked']) {
    const value = detail[field];
    if (typeof value === 'number') parts.push(`${value} ${field}`);
  }
  return parts.length > 0 ? parts.join(', ') : undefined;
}

/** Prints each source's state and progress as they change, and each retry with its reason, until the workflow closes. */
async function followProgress(handle: WorkflowHandle, print: (line: string) => void): Promise<void> {
  const states = new Map<string, string>();
  const attempts = new Map<string, number>();
  const details = new Map<string, string>();
  for (;;) {
    const description = await handle.describe();
    try {
      const progress = await handle.query<BackupProgress>('progress');
      for (const source of progress.sources) {
        const label = `${source.kind} ${source.name}`;
        const line = source.state === 'failed' ? `failed: ${source.error}` : source.state;
        if (states.get(label) !== line) {
          states.set(label, line);
          print(`  ${label}: ${line}`);
        }
      }
    } catch {
      // The query fails until the workflow's first task ran; try again on the next round.
    }
    const pending = (description.raw.pendingActivities ?? []) as PendingActivity[];
    for (const activity of pending) {
      const id = activity.activityId ?? '';
      const detail = heartbeatDetail(activity);
      const line = detail ? formatHeartbeat(detail) : undefined;
      if (line && details.get(id) !== line) {
        details.set(id, line);
        print(`  ${id}: ${line}`);
      }
      const attempt = activity.attempt ?? 1;
      if (attempt > 1 && attempts.get(id) !== attempt) {
        attempts.set(id, attempt);
        print(`  ${id}: attempt ${attempt}, after: ${activity.lastFailure?.message ?? 'timeout'}`);
      }
    }
    if (description.status.name !== 'RUNNING') return;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

function printResult(result: BackupWorkflowResult, print: (line: string) => void): void {
  print(`backup ${result.backupId} of plan ${result.plan}: ${result.status}`);
  // With replicas, the destination lines below name the ones that received the backup.
  print(result.destinations ? `  destinations ${result.destination}` : `  stored in ${result.destination}`);
  print(`  manifest ${result.manifestKey} (sha256 ${result.manifestSha256})`);
  for (const artifact of result.artifacts) {
    print(`  ${artifact.source}: ${artifact.key}, ${formatBytes(artifact.size)}, sha256 ${artifact.sha256}`);
  }
  for (const destination of result.destinations ?? []) {
    print(`  destination ${destination.name}: ${destination.state}${destination.error ? `: ${destination.error}` : ''}`);
  }
  for (const replica of result.caughtUp ?? []) {
    if (replica.copied.length > 0) print(`  destination ${replica.name}: copied ${replica.copied.length} earlier backup(s) it missed: ${replica.copied.join(', ')}`);
    for (const entry of replica.damaged ?? []) {
      print(`  destination ${replica.name}: not copied ${entry.backupId}, whose primary copy is damaged: ${entry.reason}`);
    }
    if (replica.error) print(`  destination ${replica.name}: catch-up stopped: ${replica.error}`);
  }
  for (const failure of result.failures) {
    if (failure.kind === 'destination') continue;
    print(`  ${failure.kind} source "${failure.source}" failed (${failure.type}): ${failure.message}`);
  }
}

async function backupCommand(options: { plan: string; wait?: boolean; json?: boolean; secretCheck: boolean }): Promise<number> {
  const plan = loadCheckedPlan(options.plan, options.secretCheck);
  const { client, connection, taskQueue } = await connectClient();
  const print = options.json ? (line: string) => process.stderr.write(`${line}\n`) : (line: string) => console.log(line);
  try {
    // The plan's fixed id: Temporal rejects the start while a manual or scheduled backup of the plan runs.
    const workflowId = planWorkflowId(plan.name, 'backup');
    const handle = await client.workflow.start('backupWorkflow', { taskQueue, workflowId, args: [{ plan }] }).catch(async (error: unknown) => {
      if (!(error instanceof WorkflowExecutionAlreadyStartedError)) throw error;
      // The running backup may have been started on another task queue; name the one it waits on.
      const runningQueue = await client.workflow
        .getHandle(workflowId)
        .describe()
        .then((description) => description.taskQueue)
        .catch(() => taskQueue);
      throw new ExitError(
        `a backup of plan ${plan.name} is already running as workflow ${workflowId}; wait for it ` +
          `(temporal workflow show --workflow-id ${workflowId}) and try again. If no worker polls task queue "${runningQueue}", ` +
          `start one, or end that run with: temporal workflow terminate --workflow-id ${workflowId}`,
        EXIT_BUSY,
      );
    });
    await warnWithoutWorker(client, taskQueue);
    if (!options.wait) {
      if (options.json) console.log(JSON.stringify({ workflowId, runId: handle.firstExecutionRunId }));
      else print(`started backup of plan ${plan.name}: workflow ${workflowId}`);
      return EXIT_OK;
    }
    print(`backup of plan ${plan.name} running as workflow ${workflowId}`);
    // Ctrl-C stops the CLI, not the backup: the workflow runs on in Temporal.
    process.once('SIGINT', () => {
      process.stderr.write(
        `\nopa-backup: interrupted; the backup goes on as workflow ${workflowId}. ` +
          `Follow it with: temporal workflow show --workflow-id ${workflowId}\n`,
      );
      process.exit(130);
    });
    await followProgress(handle, print);
    let result: BackupWorkflowResult;
    try {
      result = await handle.result();
    } catch (error) {
      const cause = error instanceof WorkflowFailedError ? rootMessage(error) : (error as Error).message;
      if (options.json) console.log(JSON.stringify({ workflowId, status: 'failed', error: cause }));
      throw new ExitError(`backup failed: ${cause}`, EXIT_FAILED);
    }
    if (options.json) console.log(JSON.stringify(result, null, 2));
    else printResult(result, print);
    return result.status === 'complete' ? EXIT_OK : EXIT_PARTIAL;
  } finally {
    await connection.close();
  }
}

async function listCommand(options: { plan: string; json?: boolean }): Promise<number> {
  const plan = loadCheckedPlan(options.plan, false);
  const backups = await listBackups(plan);
  const damaged = backups.some((backup) => backup.status === 'unreadable');
  const unreachable = Object.entries(backups.unreachable);
  if (options.json) {
    console.log(JSON.stringify({ plan: plan.name, destination: backups.destination, unreachable: backups.unreachable, backups: [...backups] }, null, 2));
    return damaged || unreachable.length > 0 ? EXIT_FAILED : EXIT_OK;
  }
  for (const [name, message] of unreachable) console.error(`opa-backup: destination ${name} cannot be listed: ${message}`);
  if (backups.length === 0) {
    console.log(`no backups of plan ${plan.name} in ${backups.destination}`);
    return EXIT_OK;
  }
  console.log(`backups of plan ${plan.name} in ${backups.destination}:`);
  const replicated = plan.replicas !== undefined;
  console.log(['BACKUP ID'.padEnd(28), 'STATUS'.padEnd(10), 'ARTIFACTS'.padEnd(10), 'SIZE'.padEnd(10), 'COMPLETED'.padEnd(replicated ? 25 : 0), ...(replicated ? ['DESTINATIONS'] : [])].join(' ').trimEnd());
  for (const backup of backups) {
    console.log(
      [
        backup.backupId.padEnd(28),
        backup.status.padEnd(10),
        String(backup.artifacts).padEnd(10),
        formatBytes(backup.size).padEnd(10),
        backup.completedAt.padEnd(replicated ? 25 : 0),
        ...(replicated ? [backup.destinations.join(',')] : []),
      ].join(' ').trimEnd(),
    );
    if (backup.error) console.log(`  ${backup.error}`);
  }
  // A manifest that cannot be read, or a destination that cannot be listed, is something a person must look at.
  return damaged || unreachable.length > 0 ? EXIT_FAILED : EXIT_OK;
}

export function buildProgram(): Command {
  const program = new Command('opa-backup')
    .description('Back up Open Policy Agent deployments and their data sources through Temporal, and verify, drill, schedule and prune the backups.')
    .showHelpAfterError()
    .exitOverride();

  program
    .command('backup')
    .description('start a backup of every source in a plan')
    .requiredOption('--plan <file>', 'backup plan (YAML)')
    .option('--wait', 'wait for the backup, printing progress, and exit non-zero when it fails or is partial')
    .option('--json', 'print the result as JSON on stdout (progress goes to stderr)')
    .addOption(
      new Option('--no-secret-check', 'skip checking that secret references resolve here (for workers with another environment)'),
    )
    .action(async (options) => {
      process.exitCode = await backupCommand(options);
    });

  program
    .command('list')
    .description("list a plan's backups in its destination")
    .requiredOption('--plan <file>', 'backup plan (YAML)')
    .option('--json', 'print the list as JSON')
    .action(async (options) => {
      process.exitCode = await listCommand(options);
    });

  addVerifyCommands(program);
  addDoctorCommand(program);
  addScheduleCommands(program);
  addRetentionCommand(program);
  addDrillCommand(program);
  addStatusCommand(program);

  return program;
}

export async function main(argv: string[]): Promise<void> {
  try {
    await buildProgram().parseAsync(argv);
  } catch (error) {
    if (error instanceof CommanderError) {
      process.exitCode = error.exitCode === 0 ? EXIT_OK : EXIT_USAGE;
      return;
    }
    if (error instanceof ExitError) {
      console.error(`opa-backup: ${error.message}`);
      process.exitCode = error.exitCode;
      return;
    }
    // Temporal client errors (namespace not found, workflow already started)
    // carry their own message; the stack only helps with a bug, on request.
    const detail = process.env.OPA_BACKUP_DEBUG ? ((error as Error).stack ?? String(error)) : rootMessage(error);
    console.error(`opa-backup: ${(error as Error).name ?? 'Error'}: ${detail}`);
    process.exitCode = EXIT_FAILED;
  }
}

if (require.main === module) {
  void main(process.argv);
}
