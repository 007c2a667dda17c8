// Workflows that Temporal Schedules start. A schedule appends the fire time
// to the workflow id of each run, so the id of a scheduled run differs from
// the CLI's. These wrappers start the real workflow as a child with the
// plan's fixed id (planWorkflowId): Temporal allows one open workflow per
// id, so a second start while a backup (or a retention run) of the same plan
// runs fails, and the wrapper completes as skipped instead of running both.
import {
  ActivityFailure,
  ApplicationFailure,
  log,
  proxyActivities,
  startChild,
} from '@temporalio/workflow';
import { WorkflowExecutionAlreadyStartedError } from '@temporalio/common';
import type * as activities from '../activities';
import { NON_RETRYABLE_FAILURES } from '../common/failures';
import { planWorkflowId, type ScheduleKind } from '../common/plan';
import type { BackupWorkflowInput } from '../common/workflow-types';

export interface ScheduledRunResult {
  /** "skipped" when a run of the same kind and plan was already running. */
  outcome: 'completed' | 'skipped';
  /** Fixed workflow id of the child (or of the run that was already running). */
  workflowId: string;
  reason?: string;
  /** The child workflow's result. */
  result?: unknown;
}

const { loadPlan } = proxyActivities<typeof activities>({
  startToCloseTimeout: '1m',
  retry: { initialInterval: '1s', maximumAttempts: 5, nonRetryableErrorTypes: [...NON_RETRYABLE_FAILURES] },
});

async function runExclusive(kind: ScheduleKind, workflowType: string, input: BackupWorkflowInput, extra: object): Promise<ScheduledRunResult> {
  let plan;
  try {
    plan = await loadPlan({ plan: input?.plan, planFile: input?.planFile });
  } catch (error) {
    const cause = error instanceof ActivityFailure && error.cause instanceof ApplicationFailure ? error.cause : undefined;
    throw ApplicationFailure.create({ type: cause?.type ?? 'InvalidPlan', nonRetryable: true, message: cause?.message ?? (error as Error).message });
  }
  const workflowId = planWorkflowId(plan.name, kind);
  let child;
  try {
    child = await startChild(workflowType, { workflowId, args: [{ plan, ...extra }] });
  } catch (error) {
    if (error instanceof WorkflowExecutionAlreadyStartedError) {
      const reason = `a ${kind} of plan ${plan.name} is already running as workflow ${workflowId}`;
      log.warn(`scheduled ${kind} skipped: ${reason}`, { plan: plan.name, workflowId });
      return { outcome: 'skipped', workflowId, reason };
    }
    throw error;
  }
  return { outcome: 'completed', workflowId, result: await child.result() };
}

/** Runs backupWorkflow for a schedule, unless a backup of the plan is running. */
export async function scheduledBackupWorkflow(input: BackupWorkflowInput): Promise<ScheduledRunResult> {
  return runExclusive('backup', 'backupWorkflow', input, {});
}

/** Runs retentionWorkflow for a schedule, unless a retention run of the plan is running. */
export async function scheduledRetentionWorkflow(input: BackupWorkflowInput): Promise<ScheduledRunResult> {
  return runExclusive('retention', 'retentionWorkflow', input, { dryRun: false });
}
