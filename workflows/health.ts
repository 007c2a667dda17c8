// healthWorkflow: checks the plan's `health` limits. It judges the age of
// the newest complete backup in the primary destination and in each
// replica, of each source's newest stored artifact and of the newest passed
// restore drill. It also lists the bundles each OPA source has loaded. Each OPA
// source and each replica is its own activity, so one that cannot be
// reached makes its own check unknown and leaves the others alone.
import { ActivityFailure, ApplicationFailure, proxyActivities } from '@temporalio/workflow';
import type * as activities from '../activities';
import type { HealthCheck, HealthReport } from '../activities/health';
import { NON_RETRYABLE_FAILURES } from '../common/failures';
import type { Plan } from '../common/plan';

export interface HealthWorkflowInput {
  /** Absolute path of a plan file the worker can read. */
  planFile?: string;
  plan?: Plan;
}

const planActivities = proxyActivities<typeof activities>({
  startToCloseTimeout: '1m',
  retry: { initialInterval: '1s', maximumAttempts: 3, nonRetryableErrorTypes: [...NON_RETRYABLE_FAILURES] },
});

// A health check reports the state it finds now, so a long retry would only delay the report.
const checkActivities = proxyActivities<typeof activities>({
  startToCloseTimeout: '5m',
  heartbeatTimeout: '1m',
  retry: { initialInterval: '1s', maximumInterval: '5s', maximumAttempts: 3, nonRetryableErrorTypes: [...NON_RETRYABLE_FAILURES] },
});

function failureMessage(error: unknown): string {
  const cause = error instanceof ActivityFailure && error.cause ? error.cause : error;
  return (cause as Error)?.message ?? String(cause);
}

export async function healthWorkflow(input: HealthWorkflowInput): Promise<HealthReport> {
  let plan: Plan;
  try {
    plan = await planActivities.loadPlan(input ?? {});
  } catch (error) {
    // Fail with the plan's own message, not "activity task failed".
    const cause = error instanceof ActivityFailure && error.cause instanceof ApplicationFailure ? error.cause : undefined;
    throw ApplicationFailure.create({ type: cause?.type ?? 'InvalidPlan', nonRetryable: true, message: failureMessage(error) });
  }
  // Workflow time is deterministic: it is the time of the task that runs this line.
  const checkedAt = new Date().toISOString();

  const unreadable = (name: string, error: unknown): HealthCheck[] => [
    { name, kind: 'backup', state: 'unknown', failed: true, reason: `cannot read the backups of plan ${plan.name}: ${failureMessage(error)}` },
  ];
  const stored = checkActivities.checkStoredBackups({ plan }).catch((error: unknown) => unreadable('backup', error));
  const replicas = (plan.replicas ?? []).map((replica) =>
    checkActivities.checkReplicaBackups({ plan, replica: replica.name }).catch((error: unknown) => unreadable(`backup ${replica.name}`, error)),
  );
  const bundles = (plan.sources.opa ?? []).map((source) =>
    checkActivities.checkOpaBundles({ plan, source: source.name }).catch((error: unknown): HealthCheck[] => [
      { name: `opa ${source.name}`, kind: 'opa', state: 'unknown', failed: true, reason: `cannot check OPA "${source.name}": ${failureMessage(error)}` },
    ]),
  );
  const checks = (await Promise.all([stored, ...replicas, ...bundles])).flat();
  return {
    plan: plan.name,
    checkedAt,
    ranBy: 'temporal',
    checks,
    stale: checks.filter((check) => check.state === 'stale').map((check) => check.name),
    failed: checks.filter((check) => check.failed).map((check) => check.name),
  };
}
