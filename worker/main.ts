// The opa-backup worker: polls the task queue, runs workflows and
// activities, and shuts down gracefully on SIGTERM or SIGINT, letting running
// activities finish within the grace time before it exits.
import { DefaultLogger, makeTelemetryFilterString, NativeConnection, Runtime, Worker, type LogEntry } from '@temporalio/worker';
import type { Duration } from '@temporalio/common';
import * as activities from '../activities';
import { reapDrillLeftovers } from '../activities/drill/scratch';
import { logger } from '../activities/logging';
import { metricsTelemetryOptions, startProjectMetrics, METRICS_ADDRESS_VARIABLE } from './metrics';
import { temporalSettings } from '../common/config';

function installRuntimeLogger(metrics: ReturnType<typeof metricsTelemetryOptions>): void {
  const sdkLogger = logger.child({ component: 'temporal-sdk' });
  Runtime.install({
    // Forward the SDK core's own logs to the same JSON lines.
    telemetryOptions: {
      logging: { forward: {}, filter: makeTelemetryFilterString({ core: 'WARN', other: 'WARN' }) },
      ...(metrics ? { metrics } : {}),
    },
    logger: new DefaultLogger('INFO', (entry: LogEntry) => {
      const fields = { ...(entry.meta ?? {}) };
      const level = entry.level.toLowerCase();
      if (level === 'error') sdkLogger.error(fields, entry.message);
      else if (level === 'warn') sdkLogger.warn(fields, entry.message);
      else if (level === 'debug' || level === 'trace') sdkLogger.debug(fields, entry.message);
      else sdkLogger.info(fields, entry.message);
    }),
  });
}

async function main(): Promise<void> {
  const settings = temporalSettings();
  let metrics: ReturnType<typeof metricsTelemetryOptions>;
  try {
    metrics = metricsTelemetryOptions();
    installRuntimeLogger(metrics);
  } catch (error) {
    logger.error({ error: (error as Error).message, [METRICS_ADDRESS_VARIABLE]: process.env[METRICS_ADDRESS_VARIABLE] }, 'cannot start the worker runtime');
    process.exitCode = 1;
    return;
  }
  if (metrics && 'prometheus' in metrics) {
    startProjectMetrics();
    logger.info({ address: metrics.prometheus.bindAddress, variable: METRICS_ADDRESS_VARIABLE }, 'Prometheus metrics served at /metrics');
  }
  logger.info({ address: settings.address, namespace: settings.namespace, taskQueue: settings.taskQueue }, 'worker starting');
  // A worker that died during a drill left its servers and scratch files behind.
  try {
    await reapDrillLeftovers();
  } catch (error) {
    logger.error({ error: (error as Error).message }, 'cannot remove the leftovers of earlier drills; starting anyway');
  }

  let connection: NativeConnection;
  try {
    connection = await NativeConnection.connect({ address: settings.address });
  } catch (error) {
    logger.error(
      { address: settings.address, error: (error as Error).message },
      'cannot connect to Temporal; start a server (temporal server start-dev) or set TEMPORAL_ADDRESS',
    );
    process.exitCode = 1;
    return;
  }

  try {
    const worker = await Worker.create({
      connection,
      namespace: settings.namespace,
      taskQueue: settings.taskQueue,
      workflowsPath: require.resolve('../workflows'),
      activities,
      shutdownGraceTime: (process.env.OPA_BACKUP_SHUTDOWN_GRACE || '20s') as Duration,
    });
    logger.info({ taskQueue: settings.taskQueue }, 'worker started');
    await worker.run();
    logger.info('worker stopped');
  } finally {
    await connection.close();
  }
}

main().catch((error: unknown) => {
  logger.error({ error: (error as Error).stack ?? String(error) }, 'worker failed');
  process.exit(1);
});
