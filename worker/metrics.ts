// The worker's Prometheus endpoint. The Temporal SDK's core runtime serves
// it: its own worker metrics and the project's (activities/metrics.ts),
// which are created on the runtime's metric meter.
import { Runtime, type RuntimeOptions } from '@temporalio/worker';
import { installMetricMeter, STEP_DURATION_BUCKETS, METRIC_NAMES, updateBackupAges } from '../activities/metrics';

/** Environment variable with the host:port of the endpoint, such as 127.0.0.1:9464. */
export const METRICS_ADDRESS_VARIABLE = 'OPA_BACKUP_METRICS_ADDRESS';

/** How often the backup age gauge is recomputed. */
const AGE_UPDATE_INTERVAL_MS = 15_000;

/**
 * Returns the metrics part of Runtime.install's telemetry options, or
 * undefined when OPA_BACKUP_METRICS_ADDRESS is unset or empty. Throws on an
 * address that is not host:port, naming the variable.
 */
export function metricsTelemetryOptions(
  env: NodeJS.ProcessEnv = process.env,
): NonNullable<RuntimeOptions['telemetryOptions']>['metrics'] | undefined {
  const address = env[METRICS_ADDRESS_VARIABLE]?.trim();
  if (!address) return undefined;
  const match = /^(\[[0-9a-fA-F:]+\]|[^\s:/]+):(\d{1,5})$/.exec(address);
  if (!match || Number(match[2]) > 65535) {
    throw new Error(`${METRICS_ADDRESS_VARIABLE}="${address}" is not host:port; set it to an address such as 127.0.0.1:9464, or unset it to turn metrics off`);
  }
  return {
    prometheus: {
      bindAddress: address,
      // Prometheus naming: counters end in _total, durations are seconds.
      countersTotalSuffix: true,
      useSecondsForDurations: true,
      histogramBucketOverrides: { [METRIC_NAMES.stepDuration]: STEP_DURATION_BUCKETS },
    },
  };
}

/**
 * Creates the project's instruments on the installed runtime's meter and
 * starts the timer of the backup age gauge. Call after Runtime.install with
 * metrics options.
 */
export function startProjectMetrics(): void {
  installMetricMeter(Runtime.instance().metricMeter);
  setInterval(() => updateBackupAges(), AGE_UPDATE_INTERVAL_MS).unref();
}
