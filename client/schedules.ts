// `opa-backup schedule ...`: Temporal Schedules for a plan's backups,
// restore drills and retention runs. Each kind has one schedule with the id
// opa-backup/<plan>/<kind>; `apply` creates or updates them from the plan and
// deletes those of kinds the plan no longer schedules. The schedules are
// plain Temporal Schedules, so `temporal schedule ...` operates them too.
import { Command, Option } from 'commander';
import {
  Client,
  Connection,
  ScheduleNotFoundError,
  type ScheduleDescription,
  type ScheduleOptions,
  type ScheduleOverlapPolicy,
  type ScheduleSpec,
} from '@temporalio/client';
import { loadPlanFile, PlanError } from '../activities/plan-loader';
import { temporalSettings } from '../common/config';
import { planWorkflowId, type DrillScheduleTiming, type Plan, type ScheduleKind, type ScheduleTiming } from '../common/plan';
import { hasRetentionRules } from '../common/retention';

const EXIT_OK = 0;
const EXIT_FAILED = 1;
const EXIT_USAGE = 2;
/** Another run of the same kind and plan is running; try again later (EX_TEMPFAIL of sysexits.h). */
export const EXIT_BUSY = 75;

export const SCHEDULE_KINDS: readonly ScheduleKind[] = ['backup', 'drill', 'retention'];

/** Schedule of retention runs when the plan has retention rules and no schedule.retention. */
export const DEFAULT_RETENTION_SCHEDULE = '@daily';

/** Catch-up window when the plan sets none: runs missed by more than this while Temporal was down are skipped. */
export const DEFAULT_CATCHUP_WINDOW = '1h';

/** An error with the exit code the CLI ends with; the message is printed after "opa-backup: ". */
export class CommandError extends Error {
  constructor(message: string, readonly exitCode: number) {
    super(message);
    this.name = 'CommandError';
  }
}

/** Returns the id of a plan's schedule of one kind. */
export function scheduleId(planName: string, kind: ScheduleKind): string {
  // Equal to the fixed workflow id of the kind; schedule ids and workflow ids do not collide.
  return planWorkflowId(planName, kind);
}

const OVERLAP: Record<NonNullable<ScheduleTiming['overlap']>, ScheduleOverlapPolicy> = {
  skip: 'SKIP',
  bufferOne: 'BUFFER_ONE',
  bufferAll: 'BUFFER_ALL',
  cancelOther: 'CANCEL_OTHER',
  terminateOther: 'TERMINATE_OTHER',
  allowAll: 'ALLOW_ALL',
};

/** A schedule the plan requests: its id, when it fires and what it starts. */
export interface DesiredSchedule {
  kind: ScheduleKind;
  scheduleId: string;
  spec: ScheduleSpec;
  overlap: ScheduleOverlapPolicy;
  catchupWindow: string;
  /** Set when the plan states it; otherwise apply keeps the schedule's current state. */
  paused?: boolean;
  workflowType: string;
  /** Prefix of the started workflows' ids; Temporal appends the fire time. */
  workflowId: string;
  args: unknown[];
}

function normalise<T extends ScheduleTiming | DrillScheduleTiming>(value: string | T): T {
  return (typeof value === 'string' ? { cron: value } : value) as T;
}

function specOf(timing: ScheduleTiming | DrillScheduleTiming, timeZone: string): ScheduleSpec {
  const spec: ScheduleSpec = timing.cron
    ? { cronExpressions: [timing.cron] }
    : { intervals: [{ every: timing.every as never, offset: timing.offset as never }] };
  spec.timezone = timeZone;
  if (timing.jitter) spec.jitter = timing.jitter as never;
  return spec;
}

/** Returns the schedules that a plan requests, one per kind it schedules. */
export function desiredSchedules(plan: Plan): DesiredSchedule[] {
  const timeZone = plan.schedule?.timezone ?? 'UTC';
  const desired: DesiredSchedule[] = [];
  const add = (
    kind: ScheduleKind,
    timing: ScheduleTiming | DrillScheduleTiming,
    workflowType: string,
    workflowId: string,
    args: unknown[],
  ): void => {
    desired.push({
      kind,
      scheduleId: scheduleId(plan.name, kind),
      spec: specOf(timing, timeZone),
      overlap: OVERLAP[timing.overlap ?? 'skip'],
      catchupWindow: timing.catchupWindow ?? DEFAULT_CATCHUP_WINDOW,
      paused: timing.paused,
      workflowType,
      workflowId,
      args,
    });
  };

  if (plan.schedule?.backup) {
    const timing = normalise<ScheduleTiming>(plan.schedule.backup);
    add('backup', timing, 'scheduledBackupWorkflow', `opa-backup/${plan.name}/scheduled-backup`, [{ plan }]);
  }
  if (plan.schedule?.drill) {
    const timing = normalise<DrillScheduleTiming>(plan.schedule.drill);
    const input: Record<string, unknown> = { plan, backup: timing.backup ?? 'latest' };
    if (timing.randomWithinDays !== undefined) input.randomWithinDays = timing.randomWithinDays;
    add('drill', timing, 'restoreDrillWorkflow', `opa-backup/${plan.name}/drill`, [input]);
  }
  if (hasRetentionRules(plan.retention)) {
    const timing = normalise<ScheduleTiming>(plan.schedule?.retention ?? DEFAULT_RETENTION_SCHEDULE);
    add('retention', timing, 'scheduledRetentionWorkflow', `opa-backup/${plan.name}/scheduled-retention`, [{ plan }]);
  }
  return desired;
}

function scheduleOptions(desired: DesiredSchedule, taskQueue: string, paused: boolean): ScheduleOptions {
  return {
    scheduleId: desired.scheduleId,
    spec: desired.spec,
    action: {
      type: 'startWorkflow',
      workflowType: desired.workflowType,
      workflowId: desired.workflowId,
      taskQueue,
      args: desired.args,
    },
    policies: { overlap: desired.overlap, catchupWindow: desired.catchupWindow as never },
    state: { paused, note: `applied by opa-backup schedule apply` },
  };
}

async function describeOrUndefined(client: Client, id: string): Promise<ScheduleDescription | undefined> {
  try {
    return await client.schedule.getHandle(id).describe();
  } catch (error) {
    if (error instanceof ScheduleNotFoundError) return undefined;
    throw error;
  }
}

export interface AppliedSchedule {
  kind: ScheduleKind;
  scheduleId: string;
  action: 'created' | 'updated' | 'deleted';
}

/**
 * Creates or updates the plan's schedules and deletes those of kinds the plan
 * no longer schedules. Applying the same plan again changes nothing but the
 * note. An update keeps the schedule paused or running as it is, unless the
 * plan sets `paused`.
 */
export async function applySchedules(client: Client, plan: Plan, taskQueue: string): Promise<AppliedSchedule[]> {
  const desired = desiredSchedules(plan);
  const applied: AppliedSchedule[] = [];
  for (const schedule of desired) {
    const current = await describeOrUndefined(client, schedule.scheduleId);
    if (!current) {
      await client.schedule.create(scheduleOptions(schedule, taskQueue, schedule.paused ?? false));
      applied.push({ kind: schedule.kind, scheduleId: schedule.scheduleId, action: 'created' });
      continue;
    }
    const paused = schedule.paused ?? current.state.paused;
    const options = scheduleOptions(schedule, taskQueue, paused);
    await client.schedule.getHandle(schedule.scheduleId).update((previous) => ({
      ...previous,
      spec: options.spec,
      action: options.action,
      policies: { ...previous.policies, ...options.policies },
      state: { ...previous.state, paused, note: options.state!.note },
    }));
    applied.push({ kind: schedule.kind, scheduleId: schedule.scheduleId, action: 'updated' });
  }
  for (const kind of SCHEDULE_KINDS) {
    if (desired.some((schedule) => schedule.kind === kind)) continue;
    const id = scheduleId(plan.name, kind);
    if (await describeOrUndefined(client, id)) {
      await client.schedule.getHandle(id).delete();
      applied.push({ kind, scheduleId: id, action: 'deleted' });
    }
  }
  return applied;
}

const MONTH_NAMES = ['JANUARY', 'FEBRUARY', 'MARCH', 'APRIL', 'MAY', 'JUNE', 'JULY', 'AUGUST', 'SEPTEMBER', 'OCTOBER', 'NOVEMBER', 'DECEMBER'];
const DAY_NAMES = ['SUNDAY', 'MONDAY', 'TUESDAY', 'WEDNESDAY', 'THURSDAY', 'FRIDAY', 'SATURDAY'];

/**
 * Formats one calendar of a schedule as the five cron fields it came from,
 * such as "0 3 * * *": Temporal stores a cron expression as calendars.
 */
export function formatCalendar(calendar: {
  minute?: Array<{ start: number; end?: number; step?: number }>;
  hour?: Array<{ start: number; end?: number; step?: number }>;
  dayOfMonth?: Array<{ start: number; end?: number; step?: number }>;
  month?: Array<{ start: string; end?: string; step?: number }>;
  dayOfWeek?: Array<{ start: string; end?: string; step?: number }>;
}): string {
  const field = (ranges: Array<{ start: number; end?: number; step?: number }> | undefined, min: number, max: number): string => {
    if (!ranges || ranges.length === 0) return '*';
    return ranges
      .map(({ start, end = start, step = 1 }) => {
        let span = `${start}-${end}`;
        if (start === min && end === max) span = '*';
        else if (start === end) span = String(start);
        return step > 1 ? `${span}/${step}` : span;
      })
      .join(',');
  };
  const named = (ranges: Array<{ start: string; end?: string; step?: number }> | undefined, names: string[], offset: number) =>
    ranges?.map(({ start, end, step }) => ({ start: names.indexOf(start) + offset, end: names.indexOf(end ?? start) + offset, step }));
  return [
    field(calendar.minute, 0, 59),
    field(calendar.hour, 0, 23),
    field(calendar.dayOfMonth, 1, 31),
    field(named(calendar.month, MONTH_NAMES, 1), 1, 12),
    field(named(calendar.dayOfWeek, DAY_NAMES, 0), 0, 6),
  ].join(' ');
}

/** Formats a schedule's timing for people: cron fields, or "every 6h". */
function formatTiming(summary: Record<string, unknown>): string {
  const intervals = summary.intervals as Array<{ every: number; offset?: number }> | undefined;
  if (intervals) return intervals.map((interval) => `every ${formatMs(interval.every)}${interval.offset ? ` at offset ${formatMs(interval.offset)}` : ''}`).join(', ');
  const calendars = summary.calendars as Array<Parameters<typeof formatCalendar>[0]> | undefined;
  return calendars ? `cron "${calendars.map((calendar) => formatCalendar(calendar)).join('", "')}"` : 'no timing';
}

function formatMs(milliseconds: number | undefined): string {
  if (milliseconds === undefined) return '0s';
  for (const [unit, size] of [['d', 86_400_000], ['h', 3_600_000], ['m', 60_000], ['s', 1000]] as const) {
    if (milliseconds % size === 0 && milliseconds >= size) return `${milliseconds / size}${unit}`;
  }
  return `${milliseconds}ms`;
}

/** Summarises a schedule for `list`, `describe` and --json output. */
export function summariseSchedule(kind: ScheduleKind, description: ScheduleDescription): Record<string, unknown> {
  const spec = description.spec;
  const action = description.action as { workflowType?: string; workflowId?: string };
  return {
    kind,
    scheduleId: description.scheduleId,
    paused: description.state.paused,
    note: description.state.note,
    // Temporal stores a cron expression as calendars, so describe returns those.
    calendars: spec.calendars?.length ? spec.calendars : undefined,
    intervals: spec.intervals?.length ? spec.intervals.map((interval) => ({ every: interval.every, offset: interval.offset })) : undefined,
    timezone: spec.timezone,
    jitterMs: spec.jitter,
    overlap: description.policies.overlap,
    catchupWindowMs: description.policies.catchupWindow,
    workflowType: action.workflowType,
    workflowId: action.workflowId,
    nextRuns: description.info.nextActionTimes.slice(0, 3).map((time) => time.toISOString()),
    recentRuns: description.info.recentActions.slice(-5).map((run) => ({
      scheduledAt: run.scheduledAt.toISOString(),
      workflowId: run.action.workflow.workflowId,
    })),
    runs: description.info.numActionsTaken,
    skippedForOverlap: description.info.numActionsSkippedOverlap,
  };
}

interface CommonOptions {
  plan: string;
  kind?: ScheduleKind;
  json?: boolean;
  secretCheck?: boolean;
}

function loadPlan(file: string, checkSecrets: boolean): Plan {
  try {
    return loadPlanFile(file, { checkReferences: checkSecrets });
  } catch (error) {
    if (error instanceof PlanError) throw new CommandError(`invalid plan:\n${error.message}`, EXIT_USAGE);
    throw error;
  }
}

/** Connects to Temporal as the CLI does, and closes the connection after `action`. */
export async function withClient<T>(action: (client: Client, taskQueue: string) => Promise<T>): Promise<T> {
  const settings = temporalSettings();
  let connection: Connection;
  try {
    connection = await Connection.connect({ address: settings.address, connectTimeout: '5s' });
  } catch (error) {
    throw new CommandError(
      `cannot connect to Temporal at ${settings.address}: ${(error as Error).message}; start a server or set TEMPORAL_ADDRESS`,
      EXIT_FAILED,
    );
  }
  try {
    return await action(new Client({ connection, namespace: settings.namespace }), settings.taskQueue);
  } finally {
    await connection.close();
  }
}

/** temporal.api.enums.v1.TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW: the pollers of workflow tasks. */
const TASK_QUEUE_TYPE_WORKFLOW = 1;

/**
 * Prints a warning on stderr when no worker has polled `taskQueue`
 * recently: a started workflow then waits until a worker starts. The
 * check is best-effort; a failed request prints nothing.
 */
export async function warnWithoutWorker(client: Client, taskQueue: string): Promise<void> {
  try {
    const response = await client.workflowService.describeTaskQueue({
      namespace: client.options.namespace,
      taskQueue: { name: taskQueue },
      taskQueueType: TASK_QUEUE_TYPE_WORKFLOW,
    });
    if ((response.pollers ?? []).length > 0) return;
    console.error(
      `opa-backup: warning: no worker polls task queue "${taskQueue}" (OPA_BACKUP_TASK_QUEUE); the workflow waits until one starts. ` +
        'Start one with: node dist/worker/main.js, with the same TEMPORAL_ADDRESS and OPA_BACKUP_TASK_QUEUE',
    );
  } catch {
    // The warning is a hint; without it the command still works.
  }
}

/** Runs a command and turns a CommandError into its message on stderr and its exit code. */
export async function runCommand(command: () => Promise<number>): Promise<number> {
  try {
    return await command();
  } catch (error) {
    if (error instanceof CommandError) {
      console.error(`opa-backup: ${error.message}`);
      return error.exitCode;
    }
    throw error;
  }
}

/** Returns the kinds a command acts on: the one --kind names, or every kind. */
function selectedKinds(options: CommonOptions): readonly ScheduleKind[] {
  return options.kind ? [options.kind] : SCHEDULE_KINDS;
}

async function existingSchedules(client: Client, plan: Plan, kinds: readonly ScheduleKind[]): Promise<Array<[ScheduleKind, ScheduleDescription]>> {
  const found: Array<[ScheduleKind, ScheduleDescription]> = [];
  for (const kind of kinds) {
    const description = await describeOrUndefined(client, scheduleId(plan.name, kind));
    if (description) found.push([kind, description]);
  }
  return found;
}

function noSchedule(plan: Plan, kind: ScheduleKind | undefined): CommandError {
  const what = kind ? `no ${kind} schedule` : 'no schedules';
  return new CommandError(`${what} for plan ${plan.name}; create them with: opa-backup schedule apply --plan FILE`, EXIT_FAILED);
}

async function applyCommand(options: CommonOptions): Promise<number> {
  const plan = loadPlan(options.plan, options.secretCheck ?? true);
  const applied = await withClient((client, taskQueue) => applySchedules(client, plan, taskQueue));
  if (options.json) {
    console.log(JSON.stringify({ plan: plan.name, schedules: applied }, null, 2));
  } else if (applied.length === 0) {
    console.log(`plan ${plan.name} schedules nothing (no schedule.backup, schedule.drill or retention rules)`);
  } else {
    for (const entry of applied) console.log(`${entry.action} ${entry.kind} schedule ${entry.scheduleId}`);
  }
  return EXIT_OK;
}

/**
 * Returns how a run the schedule started ended: "running", "failed", or for
 * a completed wrapper its outcome, "completed" or "skipped" with the reason
 * (a run of the same kind and plan was already running).
 */
async function runOutcome(client: Client, workflowId: string): Promise<string> {
  try {
    const handle = client.workflow.getHandle(workflowId);
    const { status } = await handle.describe();
    if (status.name !== 'COMPLETED') return status.name.toLowerCase();
    const result = (await handle.result()) as { outcome?: string; reason?: string; result?: { status?: unknown } } | undefined;
    if (result?.outcome === 'skipped') return `skipped: ${result.reason ?? 'a run was already running'}`;
    // A backup's own status: a partial backup completes its workflow too.
    return typeof result?.result?.status === 'string' ? `completed, ${result.result.status}` : 'completed';
  } catch (error) {
    return `unknown: ${(error as Error).message}`;
  }
}

async function listCommand(options: CommonOptions, detailed: boolean): Promise<number> {
  const plan = loadPlan(options.plan, false);
  const summaries = await withClient(async (client) => {
    const found = await existingSchedules(client, plan, selectedKinds(options));
    if (detailed && found.length === 0) throw noSchedule(plan, options.kind);
    const summarised = found.map(([kind, description]) => summariseSchedule(kind, description));
    if (detailed) {
      for (const summary of summarised) {
        for (const run of summary.recentRuns as Array<{ workflowId: string; outcome?: string }>) run.outcome = await runOutcome(client, run.workflowId);
      }
    }
    return summarised;
  });
  if (options.json) {
    console.log(JSON.stringify({ plan: plan.name, schedules: summaries }, null, 2));
    return EXIT_OK;
  }
  if (summaries.length === 0) {
    console.log(`no schedules for plan ${plan.name}`);
    return EXIT_OK;
  }
  for (const summary of summaries) {
    console.log(
      // Intervals count from the Unix epoch in UTC; only cron fields follow the time zone.
      `${summary.kind} ${summary.scheduleId}: ${summary.paused ? 'paused' : 'active'}, ${formatTiming(summary)}` +
        `${summary.intervals ? '' : ` in ${summary.timezone ?? 'UTC'}`}, ` +
        `next ${(summary.nextRuns as string[])[0] ?? 'none'}`,
    );
    if (!detailed) continue;
    console.log(`  starts ${summary.workflowType} as ${summary.workflowId}-<time>, overlap ${summary.overlap}, catch-up window ${formatMs(summary.catchupWindowMs as number | undefined)}`);
    if (summary.jitterMs) console.log(`  jitter ${formatMs(summary.jitterMs as number)}`);
    if (summary.note) console.log(`  note: ${summary.note}`);
    console.log(`  runs started ${summary.runs}, not started because of the overlap policy ${summary.skippedForOverlap}`);
    for (const run of summary.recentRuns as Array<{ scheduledAt: string; workflowId: string; outcome?: string }>) {
      console.log(`  ran at ${run.scheduledAt}: ${run.workflowId}, ${run.outcome}`);
    }
  }
  return EXIT_OK;
}

async function stateCommand(options: CommonOptions, change: 'pause' | 'resume' | 'trigger'): Promise<number> {
  const plan = loadPlan(options.plan, false);
  // Trigger acts on one schedule: the backup's unless --kind names another.
  const kinds = change === 'trigger' ? [options.kind ?? 'backup'] : selectedKinds(options);
  const changed = await withClient(async (client) => {
    const found = await existingSchedules(client, plan, kinds);
    if (found.length === 0) throw noSchedule(plan, change === 'trigger' ? kinds[0] : options.kind);
    for (const [, description] of found) {
      const handle = client.schedule.getHandle(description.scheduleId);
      if (change === 'pause') await handle.pause('paused by opa-backup schedule pause');
      else if (change === 'resume') await handle.unpause('resumed by opa-backup schedule resume');
      else await handle.trigger();
    }
    return found.map(([kind, description]) => ({ kind, scheduleId: description.scheduleId }));
  });
  const verb = { pause: 'paused', resume: 'resumed', trigger: 'triggered' }[change];
  if (options.json) console.log(JSON.stringify({ plan: plan.name, [verb]: changed }, null, 2));
  else for (const entry of changed) console.log(`${verb} ${entry.kind} schedule ${entry.scheduleId}`);
  return EXIT_OK;
}

/** Adds `schedule apply|list|describe|pause|resume|trigger` to the program. */
export function addScheduleCommands(program: Command): void {
  const schedule = program.command('schedule').description("manage the Temporal Schedules of a plan's backups, drills and retention");
  const kindOption = () =>
    new Option('--kind <kind>', 'act on one schedule only').choices([...SCHEDULE_KINDS]);
  const subcommand = (name: string, description: string, run: (options: CommonOptions) => Promise<number>): Command =>
    schedule
      .command(name)
      .description(description)
      .requiredOption('--plan <file>', 'backup plan (YAML)')
      .option('--json', 'print the result as JSON')
      .action(async (options: CommonOptions) => {
        process.exitCode = await runCommand(() => run(options));
      });

  subcommand('apply', "create or update the plan's schedules, and delete those the plan no longer has", applyCommand).addOption(
    new Option('--no-secret-check', 'skip checking that secret references resolve here (for workers with another environment)'),
  );
  subcommand('list', "list the plan's schedules and their next run", (options) => listCommand(options, false)).addOption(kindOption());
  subcommand('describe', "show the plan's schedules with policies and recent runs", (options) => listCommand(options, true)).addOption(
    kindOption(),
  );
  subcommand('pause', "pause the plan's schedules", (options) => stateCommand(options, 'pause')).addOption(kindOption());
  subcommand('resume', "resume the plan's paused schedules", (options) => stateCommand(options, 'resume')).addOption(kindOption());
  subcommand('trigger', 'start a run now (the backup schedule unless --kind is given)', (options) =>
    stateCommand(options, 'trigger'),
  ).addOption(kindOption());
}
