// The project's Prometheus metrics, recorded through the Temporal SDK's
// metric meter so they appear on the worker's Temporal metrics endpoint.
// worker/metrics.ts installs the meter; until then (in the CLI and in tests
// that call activities directly) every record call does nothing.
//
// Labels: `plan` (plan name), `kind` (opa, postgres, redis, bundle, git) and
// `source` (the plan's source name). A PostgreSQL database and a Redis
// Cluster master count under their source.
import type { MetricCounter, MetricGauge, MetricHistogram, MetricMeter } from '@temporalio/common';
import type { ArtifactKind, Manifest, SourceFailure } from '../common/manifest';

/** Metric names, as they appear on /metrics. */
export const METRIC_NAMES = {
  lastSuccess: 'opa_backup_last_success_timestamp_seconds',
  age: 'opa_backup_age_seconds',
  lastStatus: 'opa_backup_last_status',
  artifactBytes: 'opa_backup_artifact_bytes',
  stepDuration: 'opa_backup_step_duration_seconds',
  stepFailures: 'opa_backup_step_failures_total',
  lastDrillSuccess: 'opa_backup_last_drill_success_timestamp_seconds',
  drillRto: 'opa_backup_drill_rto_seconds',
  drills: 'opa_backup_drills_total',
} as const;

/** Bucket bounds of the step duration histogram, in seconds: from a small OPA to a 2 h dump. */
export const STEP_DURATION_BUCKETS = [0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200];

const BACKUP_STATUSES = ['complete', 'partial', 'failed'] as const;
export type BackupOutcome = (typeof BACKUP_STATUSES)[number];

type SourceKind = SourceFailure['kind'];

const SOURCE_KIND_OF_ARTIFACT: Record<ArtifactKind, SourceKind> = {
  'opa-bundle': 'opa',
  'postgres-dump': 'postgres',
  'postgres-globals': 'postgres',
  'redis-rdb': 'redis',
  'redis-keys': 'redis',
  bundle: 'bundle',
  'git-bundle': 'git',
};

/** Returns the plan source kind that produces an artifact kind. */
export function sourceKindOf(kind: ArtifactKind): SourceKind {
  return SOURCE_KIND_OF_ARTIFACT[kind];
}

/**
 * Returns the plan source name of a failure's source label: failures of a
 * PostgreSQL database ("db/entitlements") or a Redis Cluster master
 * ("cache/10.0.0.5:6379") name the source before the first "/". Plan source
 * names cannot contain "/".
 */
export function failureSourceName(label: string): string {
  const slash = label.indexOf('/');
  const name = slash < 0 ? label : label.slice(0, slash);
  return name.replace(/ \(globals\)$/, '');
}

interface Instruments {
  lastSuccess: MetricGauge;
  age: MetricGauge;
  lastStatus: MetricGauge;
  artifactBytes: MetricGauge;
  stepDuration: MetricHistogram;
  stepFailures: MetricCounter;
  lastDrillSuccess: MetricGauge;
  drillRto: MetricGauge;
  drills: MetricCounter;
}

let instruments: Instruments | undefined;

/** Last successful backup time of each (plan, kind, source), in unix milliseconds, for the age gauge. */
const lastSuccessTimes = new Map<string, { plan: string; kind: SourceKind; source: string; time: number }>();

/** Creates the project's instruments on `meter`; called once by the worker when metrics are on. */
export function installMetricMeter(meter: MetricMeter): void {
  instruments = {
    lastSuccess: meter.createGauge(METRIC_NAMES.lastSuccess, 'float', 's', 'Completion time of the newest backup that stored this source, in unix seconds.'),
    age: meter.createGauge(METRIC_NAMES.age, 'float', 's', 'Seconds since the newest backup that stored this source completed; updated every 15 seconds.'),
    lastStatus: meter.createGauge(METRIC_NAMES.lastStatus, 'int', '', 'Status of the newest backup of the plan: 1 for its status label, 0 for the others.'),
    artifactBytes: meter.createGauge(METRIC_NAMES.artifactBytes, 'int', 'By', "Stored bytes of this source's artifacts in the newest backup that stored it."),
    // The exporter's unitSuffix option is off (its default), so the name is exported as written.
    stepDuration: meter.createHistogram(METRIC_NAMES.stepDuration, 'float', 's', 'Duration of each successful backup step, from its start to its stored artifact.'),
    // countersTotalSuffix appends "_total" on export, so the instrument's own name has none.
    stepFailures: meter.createCounter(METRIC_NAMES.stepFailures.replace(/_total$/, ''), '', 'Backup steps that failed after their retries.'),
    lastDrillSuccess: meter.createGauge(METRIC_NAMES.lastDrillSuccess, 'float', 's', 'Completion time of the newest restore drill that passed, in unix seconds.'),
    drillRto: meter.createGauge(METRIC_NAMES.drillRto, 'float', 's', 'Recovery time of the newest restore drill that passed, in seconds.'),
    drills: meter.createCounter(METRIC_NAMES.drills.replace(/_total$/, ''), '', 'Restore drills by outcome.'),
  };
}

function setStatus(plan: string, status: BackupOutcome): void {
  for (const candidate of BACKUP_STATUSES) instruments?.lastStatus.set(candidate === status ? 1 : 0, { plan, status: candidate });
}

/** Sets the last success time of a source and remembers it for the age gauge. */
export function recordSourceSuccess(plan: string, kind: SourceKind, source: string, completedAt: Date): void {
  if (!instruments) return;
  const key = `${plan}\u0000${kind}\u0000${source}`;
  const previous = lastSuccessTimes.get(key);
  // Health checks report times read from the store, which may be older than a backup this worker sealed.
  if (previous && previous.time >= completedAt.getTime()) return;
  lastSuccessTimes.set(key, { plan, kind, source, time: completedAt.getTime() });
  instruments.lastSuccess.set(completedAt.getTime() / 1000, { plan, kind, source });
  instruments.age.set(Math.max(0, (Date.now() - completedAt.getTime()) / 1000), { plan, kind, source });
}

/** Recomputes the age gauge of every source seen since the worker started. */
export function updateBackupAges(now = Date.now()): void {
  if (!instruments) return;
  for (const entry of lastSuccessTimes.values()) {
    instruments.age.set(Math.max(0, (now - entry.time) / 1000), { plan: entry.plan, kind: entry.kind, source: entry.source });
  }
}

/** Records a sealed backup: status, last success time, stored bytes and step durations per source, and failed steps. */
export function recordSealedBackup(manifest: Manifest): void {
  if (!instruments) return;
  const plan = manifest.plan;
  const completedAt = new Date(manifest.completedAt);
  setStatus(plan, manifest.status);

  const bytes = new Map<string, { kind: SourceKind; source: string; size: number }>();
  for (const artifact of manifest.artifacts) {
    const kind = sourceKindOf(artifact.kind);
    const key = `${kind}\u0000${artifact.source}`;
    const entry = bytes.get(key) ?? { kind, source: artifact.source, size: 0 };
    entry.size += artifact.size;
    bytes.set(key, entry);
    const seconds = (Date.parse(artifact.completedAt) - Date.parse(artifact.startedAt)) / 1000;
    if (Number.isFinite(seconds) && seconds >= 0) instruments.stepDuration.record(seconds, { plan, kind, source: artifact.source });
  }

  // A source with a failed database or master did not fully succeed, so its
  // last success time stays at the previous backup.
  const failedSources = new Set(manifest.failures.map((failure) => `${failure.kind}\u0000${failureSourceName(failure.source)}`));
  for (const [key, entry] of bytes) {
    instruments.artifactBytes.set(entry.size, { plan, kind: entry.kind, source: entry.source });
    if (!failedSources.has(key)) recordSourceSuccess(plan, entry.kind, entry.source, completedAt);
  }
  recordStepFailures(plan, manifest.failures);
}

function recordStepFailures(plan: string, failures: SourceFailure[]): void {
  for (const failure of failures) {
    instruments?.stepFailures.add(1, { plan, kind: failure.kind, source: failureSourceName(failure.source) });
  }
}

export interface BackupMetricsInput {
  plan: string;
  status: BackupOutcome;
  failures: SourceFailure[];
}

/**
 * Activity: records a backup that sealed nothing because every source
 * failed. A sealed backup is recorded by sealBackup itself.
 */
export async function recordBackupMetrics(input: BackupMetricsInput): Promise<void> {
  if (!instruments) return;
  setStatus(input.plan, input.status);
  recordStepFailures(input.plan, input.failures);
}

export interface DrillMetricsInput {
  plan: string;
  backupId: string;
  outcome: 'passed' | 'failed';
  /** ISO 8601 completion time of the drill, as in its report. */
  completedAt: string;
  /** The report's rtoSeconds, when a restore step passed. */
  rtoSeconds?: number;
}

/** Last passed drill time of each plan, in unix milliseconds, so an older time never replaces a newer one. */
const lastDrillTimes = new Map<string, number>();

/** Sets the last drill success time of a plan unless a newer one is set; returns whether it was set. */
export function recordDrillSuccess(plan: string, completedAt: Date): boolean {
  if (!instruments || !Number.isFinite(completedAt.getTime())) return false;
  if ((lastDrillTimes.get(plan) ?? -Infinity) > completedAt.getTime()) return false;
  lastDrillTimes.set(plan, completedAt.getTime());
  instruments.lastDrillSuccess.set(completedAt.getTime() / 1000, { plan });
  return true;
}

/**
 * Activity: records a finished restore drill: the drills counter by outcome
 * and, when it passed, the last drill success time and its recovery time.
 */
export async function recordDrillMetrics(input: DrillMetricsInput): Promise<void> {
  if (!instruments) return;
  instruments.drills.add(1, { plan: input.plan, outcome: input.outcome });
  if (input.outcome !== 'passed') return;
  const newest = recordDrillSuccess(input.plan, new Date(input.completedAt));
  if (newest && input.rtoSeconds !== undefined) instruments.drillRto.set(input.rtoSeconds, { plan: input.plan });
}
