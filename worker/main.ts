// The opa-backup worker: polls the task queue, runs workflows and
// activities, and shuts down gracefully on SIGTERM or SIGINT, letting running
// activities finish within the grace time before it exits.
import { DefaultLogger, makeTelemetryFilterString, NativeConnection, Runtime, Worker, type LogEntry } from '@temporalio/worker';
import type { Duration } from '@temporalio/common';
import * as activities from '../activities';
import { logger } from '../activities/logging';
import { temporalSettings } from '../common/config';

function installRuntimeLogger(): void {
  const sdkLogger = logger.child({ component: 'temporal-sdk' });
  Runtime.install({
    // Forward the SDK core's own logs to the same JSON lines.
    telemetryOptions: { logging: { forward: {}, filter: makeTelemetryFilterString({ core: 'WARN', other: 'WARN' }) } },
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
  installRuntimeLogger();
  logger.info({ address: settings.address, namespace: settings.namespace, taskQueue: settings.taskQueue }, 'worker starting');

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
