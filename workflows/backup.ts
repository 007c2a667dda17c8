// backupWorkflow: load the plan, then back up every source in parallel: one
// activity per OPA instance, per PostgreSQL database and per Redis server
// or Redis Cluster master, per served bundle and per Git repository, each
// with its own timeouts and retries. Then seal
// the backup with its manifest, and copy to each replica the recent backups
// it missed. Workflow code is replayed: it must stay deterministic, so it
// imports only types of activities and pure helpers.
import {
  ActivityFailure,
  ApplicationFailure,
  CancellationScope,
  CancelledFailure,
  defineQuery,
  log,
  patched,
  proxyActivities,
  setHandler,
  workflowInfo,
  type ActivityOptions,
} from '@temporalio/workflow';
import type * as activities from '../activities';
import { compareStrings } from '../common/compare';
import { NON_RETRYABLE_FAILURES } from '../common/failures';
import { makeBackupId, makeBackupIdBySecond } from '../common/layout';
import { drillAfterBackup } from './drill';
import type { SourceFailure } from '../common/manifest';
import type { Plan, StepSettings } from '../common/plan';
import type {
  ArtifactReference,
  BackupProgress,
  BackupWorkflowInput,
  BackupWorkflowResult,
} from '../common/workflow-types';

/** Query that returns the state of each source while the backup runs. */
export const backupProgressQuery = defineQuery<BackupProgress>('progress');

const planActivities = proxyActivities<typeof activities>({
  startToCloseTimeout: '1m',
  retry: { initialInterval: '1s', maximumAttempts: 5, nonRetryableErrorTypes: [...NON_RETRYABLE_FAILURES] },
});

/** Activity options of one step, from the plan's settings and these defaults. */
function stepOptions(settings: StepSettings | undefined, defaultAttemptTimeout = '10m'): ActivityOptions {
  return {
    startToCloseTimeout: (settings?.attemptTimeout ?? defaultAttemptTimeout) as ActivityOptions['startToCloseTimeout'],
    heartbeatTimeout: (settings?.heartbeatTimeout ?? '30s') as ActivityOptions['heartbeatTimeout'],
    retry: {
      initialInterval: (settings?.retry?.initialInterval ?? '1s') as ActivityOptions['startToCloseTimeout'],
      maximumInterval: (settings?.retry?.maximumInterval ?? '30s') as ActivityOptions['startToCloseTimeout'],
      backoffCoefficient: 2,
      // The plan's 0 means unlimited, which the SDK spells as no limit at all.
      maximumAttempts: settings?.retry?.maximumAttempts === 0 ? undefined : (settings?.retry?.maximumAttempts ?? 10),
      nonRetryableErrorTypes: [...NON_RETRYABLE_FAILURES],
    },
  };
}

/** Returns the innermost failure's type and message, which name what to fix. */
function describeFailure(error: unknown): { type: string; message: string } {
  let current: unknown = error;
  if (current instanceof ActivityFailure && current.cause) current = current.cause;
  if (current instanceof ApplicationFailure) {
    return { type: current.type ?? 'Error', message: current.message };
  }
  return { type: (current as Error)?.name ?? 'Error', message: (current as Error)?.message ?? String(current) };
}

export async function backupWorkflow(input: BackupWorkflowInput): Promise<BackupWorkflowResult> {
  const info = workflowInfo();
  // Histories started before ids carried milliseconds replay with the old id.
  const backupId = patched('backup-id-milliseconds') ? makeBackupId(info.runStartTime, info.runId) : makeBackupIdBySecond(info.runStartTime, info.runId);
  const startedAt = info.runStartTime.toISOString();
  const progress: BackupProgress = { backupId, sources: [], sealed: false };
  setHandler(backupProgressQuery, () => progress);

  let plan;
  try {
    plan = await planActivities.loadPlan(input ?? {});
  } catch (error) {
    // Fail the workflow with the plan's own message, not "activity task failed".
    const { type, message } = describeFailure(error);
    throw ApplicationFailure.create({ type, nonRetryable: true, message });
  }
  progress.plan = plan.name;
  const opaSources = plan.sources.opa ?? [];
  const postgresSources = plan.sources.postgres ?? [];
  const redisSources = plan.sources.redis ?? [];
  const bundleSources = plan.sources.bundle ?? [];
  const gitSources = plan.sources.git ?? [];
  progress.sources = [
    ...opaSources.map((source) => ({ kind: 'opa' as const, name: source.name, state: 'pending' as const })),
    ...postgresSources.map((source) => ({ kind: 'postgres' as const, name: source.name, state: 'pending' as const })),
    ...redisSources.map((source) => ({ kind: 'redis' as const, name: source.name, state: 'pending' as const })),
    ...bundleSources.map((source) => ({ kind: 'bundle' as const, name: source.name, state: 'pending' as const })),
    ...gitSources.map((source) => ({ kind: 'git' as const, name: source.name, state: 'pending' as const })),
  ];

  const artifacts: ArtifactReference[] = [];
  const failures: SourceFailure[] = [];

  /**
   * Runs a source that is one activity, then records its artifact, or its
   * failure under `kind` with the innermost message.
   */
  const runSourceStep = async (
    state: BackupProgress['sources'][number],
    kind: SourceFailure['kind'],
    run: () => Promise<ArtifactReference>,
  ): Promise<void> => {
    state.state = 'running';
    try {
      artifacts.push(await run());
      state.state = 'done';
    } catch (error) {
      const { type, message } = describeFailure(error);
      state.state = 'failed';
      state.error = message;
      failures.push({ kind, source: state.name, type, message });
    }
  };

  const opaSteps = opaSources.map((source, index) => {
    // A named activity id lets `describe` show which source a retry belongs to.
    const { snapshotOpaSource } = proxyActivities<typeof activities>({
      ...stepOptions(plan.settings?.opaSnapshot),
      activityId: `opa-${source.name}`,
    });
    return runSourceStep(progress.sources[index], 'opa', () => snapshotOpaSource({ plan, source: source.name, backupId }));
  });

  const postgresSteps = postgresSources.map(async (source, index) => {
    const state = progress.sources[opaSources.length + index];
    state.state = 'running';
    const options = stepOptions(plan.settings?.postgresDump, '2h');
    const failed: string[] = [];
    const step = async (database: string | undefined): Promise<void> => {
      const label = database === undefined ? `${source.name} (globals)` : `${source.name}/${database}`;
      // Named activity ids let `describe` show which database a retry belongs to.
      const { dumpPostgres } = proxyActivities<typeof activities>({
        ...options,
        activityId: `postgres-${source.name}-${database === undefined ? 'globals' : `db-${database}`}`,
      });
      try {
        artifacts.push(await dumpPostgres({ plan, source: source.name, backupId, database }));
      } catch (error) {
        const { type, message } = describeFailure(error);
        failed.push(message);
        failures.push({ kind: 'postgres', source: label, type, message });
      }
    };
    let databases: string[];
    try {
      databases = await planActivities.listPostgresDatabases({ plan, source: source.name });
    } catch (error) {
      const { type, message } = describeFailure(error);
      state.state = 'failed';
      state.error = message;
      failures.push({ kind: 'postgres', source: source.name, type, message });
      return;
    }
    const steps: Array<Promise<void>> = databases.map((database) => step(database));
    if (source.globals ?? true) steps.push(step(undefined));
    await Promise.all(steps);
    state.state = failed.length > 0 ? 'failed' : 'done';
    if (failed.length > 0) state.error = failed.join('; ');
  });

  const redisSteps = redisSources.map(async (source, index) => {
    const state = progress.sources[opaSources.length + postgresSources.length + index];
    if (!source.cluster) {
      const { dumpRedisSource } = proxyActivities<typeof activities>({
        ...stepOptions(plan.settings?.redisDump, '2h'),
        activityId: `redis-${source.name}`,
      });
      return runSourceStep(state, 'redis', () => dumpRedisSource({ plan, source: source.name, backupId }));
    }
    state.state = 'running';

    // A cluster: list the masters, then dump each one in its own activity.
    let masters;
    try {
      masters = await planActivities.listRedisClusterMasters({ plan, source: source.name });
    } catch (error) {
      const { type, message } = describeFailure(error);
      state.state = 'failed';
      state.error = message;
      failures.push({ kind: 'redis', source: source.name, type, message });
      return;
    }
    const failed: string[] = [];
    await Promise.all(
      masters.map(async (master) => {
        const { dumpRedisSource } = proxyActivities<typeof activities>({
          ...stepOptions(plan.settings?.redisDump, '2h'),
          activityId: `redis-${source.name}-${master.host}-${master.port}`,
        });
        try {
          artifacts.push(await dumpRedisSource({ plan, source: source.name, backupId, node: { host: master.host, port: master.port } }));
        } catch (error) {
          const { type, message } = describeFailure(error);
          failed.push(message);
          failures.push({ kind: 'redis', source: `${source.name}/${master.host}:${master.port}`, type, message });
        }
      }),
    );
    state.state = failed.length > 0 ? 'failed' : 'done';
    if (failed.length > 0) state.error = failed.join('; ');
  });

  const bundleSteps = bundleSources.map((source, index) => {
    const { fetchBundleSource } = proxyActivities<typeof activities>({
      ...stepOptions(plan.settings?.bundleFetch),
      activityId: `bundle-${source.name}`,
    });
    const state = progress.sources[opaSources.length + postgresSources.length + redisSources.length + index];
    return runSourceStep(state, 'bundle', () => fetchBundleSource({ plan, source: source.name, backupId }));
  });

  const gitSteps = gitSources.map((source, index) => {
    const { bundleGitSource } = proxyActivities<typeof activities>({
      ...stepOptions(plan.settings?.gitBundle, '1h'),
      activityId: `git-${source.name}`,
    });
    const state = progress.sources[opaSources.length + postgresSources.length + redisSources.length + bundleSources.length + index];
    return runSourceStep(state, 'git', () => bundleGitSource({ plan, source: source.name, backupId }));
  });

  await Promise.all([...opaSteps, ...postgresSteps, ...redisSteps, ...bundleSteps, ...gitSteps]);

  // A cancelled workflow cancels its running steps, whose failures the
  // steps above record. What is left must not be sealed as a backup.
  if (CancellationScope.current().consideredCancelled) {
    throw new CancelledFailure(`backup ${backupId} of plan ${plan.name} was cancelled; nothing was sealed`);
  }

  if (artifacts.length === 0) {
    // A sealed backup records its metrics in sealBackup; this one seals nothing.
    await planActivities.recordBackupMetrics({ plan: plan.name, status: 'failed', failures }).catch(() => undefined);
    throw ApplicationFailure.create({
      type: 'BackupFailed',
      nonRetryable: true,
      message: `backup ${backupId} of plan ${plan.name} failed: no source was backed up. ${failures
        .map((failure) => `${failure.kind} source "${failure.source}": ${failure.message}`)
        .join('; ')}`,
    });
  }

  // A stable order makes manifests of equal backups compare equal.
  artifacts.sort((a, b) => compareStrings(a.key, b.key));
  failures.sort((a, b) => compareStrings(a.source, b.source));

  const sealed = await planActivities.sealBackup({
    plan,
    backupId,
    startedAt,
    workflow: { workflowId: info.workflowId, runId: info.runId },
    artifacts,
    failures,
  });
  progress.sealed = true;
  // Histories of runs started before this step existed replay without it.
  const caughtUp = patched('replica-catch-up') ? await catchUp(plan, backupId) : undefined;
  const drill = input?.drillAfter ? await drillAfterBackup(plan, backupId) : undefined;

  return {
    backupId,
    plan: plan.name,
    status: sealed.status,
    destination: await planActivities.describeDestination(plan),
    manifestKey: sealed.manifestKey,
    manifestSha256: sealed.manifestSha256,
    artifacts: artifacts.map(({ kind, source, key, size, sha256 }) => ({ kind, source, key, size, sha256 })),
    failures: sealed.failures ?? failures,
    ...(sealed.destinations ? { destinations: sealed.destinations } : {}),
    ...(caughtUp && caughtUp.length > 0 ? { caughtUp } : {}),
    ...(drill ? { drill } : {}),
  };
}

const catchUpActivities = proxyActivities<typeof activities>({
  startToCloseTimeout: '1h',
  heartbeatTimeout: '1m',
  retry: { initialInterval: '5s', maximumAttempts: 2, nonRetryableErrorTypes: [...NON_RETRYABLE_FAILURES] },
});

/**
 * Copies to each replica the recent backups it missed. The backup is sealed
 * already, so the catch below logs a failure here instead of raising it.
 */
async function catchUp(plan: Plan, backupId: string): Promise<BackupWorkflowResult['caughtUp']> {
  if (!plan.replicas || plan.replicas.length === 0) return undefined;
  try {
    const results = await catchUpActivities.catchUpReplicas({ plan, exclude: backupId });
    return results.filter((result) => result.copied.length > 0 || result.damaged || result.error);
  } catch (error) {
    log.warn('replica catch-up failed; the next backup tries again', { error: describeFailure(error).message });
    return undefined;
  }
}
