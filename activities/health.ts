// Health checks of a plan: how old its newest complete backup, each
// source's newest stored artifact and its newest passed restore drill are,
// and which bundles each OPA source has loaded and when it last fetched
// them. healthWorkflow runs these as activities; `opa-backup status --local`
// calls runHealthChecks in the CLI process.
import type { IncomingMessage } from 'node:http';
import { compareStrings } from '../common/compare';
import { manifestKey } from '../common/layout';
import type { Manifest } from '../common/manifest';
import { MANIFEST_FILE, statusInDestination } from '../common/manifest';
import type { Plan } from '../common/plan';
import { parseDuration } from '../common/retention';
import { failureSourceName, recordDrillSuccess, recordSourceSuccess, sourceKindOf } from './metrics';
import { heartbeatIfActivity } from './heartbeat';
import { connectOpa, opaRequest } from './opa/client';
import { openBlobStore, type BlobStore } from './storage';

/** ok: within its limit, or no limit applies. stale: older than its limit, or never happened. unknown: could not be determined. */
export type HealthState = 'ok' | 'stale' | 'unknown';

/** One check of a health report. */
export interface HealthCheck {
  /** "backup", "source opa/edge-1", "drill", "bundle edge-1/authz" or "opa edge-1". */
  name: string;
  kind: 'backup' | 'source' | 'drill' | 'bundle' | 'opa';
  state: HealthState;
  /** Explanation of the state, with the values that decided it. */
  reason: string;
  /** When the checked event happened (ISO 8601): backup or drill completion, or the bundle's last fetch. */
  time?: string;
  ageSeconds?: number;
  /** The plan's limit, as written in the plan ("26h"). */
  limit?: string;
  backupId?: string;
  /** Bundle checks: the bundle's revision and when OPA activated it, where OPA reports them. */
  revision?: string;
  activatedAt?: string;
  /** True when the check could not read what it checks: a destination or an OPA that cannot be reached. */
  failed?: boolean;
}

export interface HealthReport {
  plan: string;
  checkedAt: string;
  /** "temporal" when healthWorkflow ran the checks, "local" when the CLI did. */
  ranBy: 'temporal' | 'local';
  checks: HealthCheck[];
  /** Names of the stale checks. */
  stale: string[];
  /** Names of the checks that could not read what they check. */
  failed?: string[];
}

/** Largest /v1/status or data.system.bundles response read; OPA's status can carry Prometheus metrics. */
const MAX_OPA_RESPONSE_BYTES = 8 * 1024 * 1024;
const OPA_REQUEST_TIMEOUT_MS = 15_000;

/** Returns the state and reason of an age against an optional plan limit. */
function judgeAge(ageSeconds: number, limit: string | undefined, what: string): { state: HealthState; reason: string } {
  if (!limit) return { state: 'ok', reason: `${what} ${formatAge(ageSeconds)} ago; the plan sets no limit` };
  const limitSeconds = parseDuration(limit) / 1000;
  if (ageSeconds > limitSeconds) return { state: 'stale', reason: `${what} ${formatAge(ageSeconds)} ago, more than the limit of ${limit}` };
  return { state: 'ok', reason: `${what} ${formatAge(ageSeconds)} ago, within the limit of ${limit}` };
}

/** Formats seconds as the two largest units: "45s", "12m 3s", "3h 5m", "2d 4h". */
export function formatAge(seconds: number): string {
  const total = Math.max(0, Math.floor(seconds));
  const units: Array<[string, number]> = [
    ['d', 86_400],
    ['h', 3_600],
    ['m', 60],
    ['s', 1],
  ];
  const parts: string[] = [];
  let rest = total;
  for (const [unit, size] of units) {
    const count = Math.floor(rest / size);
    rest -= count * size;
    if (count > 0 || (parts.length === 0 && size === 1)) parts.push(`${count}${unit}`);
    if (parts.length > 0 && (parts.length === 2 || count === 0)) break;
  }
  return parts.join(' ');
}

async function readJson(store: BlobStore, key: string): Promise<unknown> {
  const chunks: Buffer[] = [];
  for await (const chunk of await store.get(key)) chunks.push(chunk as Buffer);
  return JSON.parse(Buffer.concat(chunks).toString('utf8')) as unknown;
}

interface StoredObjects {
  /** Backup ids with a manifest, oldest first. */
  sealed: string[];
  /** Drill report keys. */
  drillReports: string[];
}

/** Lists the plan's folders in one pass: which backups are sealed, and every drill report. */
async function listStoredObjects(store: BlobStore, planName: string): Promise<StoredObjects> {
  const prefix = `${planName}/`;
  const sealed: string[] = [];
  const drillReports: string[] = [];
  let seen = 0;
  for await (const object of store.list(prefix)) {
    if (++seen % 5000 === 0) heartbeatIfActivity({ listed: seen });
    const rest = object.key.slice(prefix.length);
    const slash = rest.indexOf('/');
    if (slash <= 0) continue;
    const inner = rest.slice(slash + 1);
    if (inner === MANIFEST_FILE) sealed.push(rest.slice(0, slash));
    else if (/^drills\/[^/]+\.json$/.test(inner)) drillReports.push(object.key);
  }
  sealed.sort();
  return { sealed, drillReports };
}

type PlanSourceKind = 'opa' | 'postgres' | 'redis' | 'bundle' | 'git';

/** Lists every source of the plan with its kind, in plan order. */
function planSources(plan: Plan): Array<{ kind: PlanSourceKind; name: string }> {
  const sources: Array<{ kind: PlanSourceKind; name: string }> = [];
  for (const kind of ['opa', 'postgres', 'redis', 'bundle', 'git'] as const) {
    for (const source of plan.sources[kind] ?? []) sources.push({ kind, name: source.name });
  }
  return sources;
}

/**
 * Reads manifests newest first until the newest complete backup, and judges
 * its age against `health.maxBackupAge`. Also returns, per source, the
 * newest backup on the way that stored it.
 */
async function checkNewestBackup(
  store: BlobStore,
  plan: Plan,
  sealed: string[],
  name: string,
  now: number,
): Promise<{ check: HealthCheck; newestComplete?: { backupId: string; completedAt: string }; sourceTimes: Map<string, { backupId: string; completedAt: string }> }> {
  const limits = plan.health ?? {};
  let newestComplete: { backupId: string; completedAt: string } | undefined;
  let newestAny: { backupId: string; status: string } | undefined;
  const unreadable: string[] = [];
  const sourceTimes = new Map<string, { backupId: string; completedAt: string }>();
  for (let index = sealed.length - 1; index >= 0 && !newestComplete; index--) {
    const backupId = sealed[index];
    heartbeatIfActivity({ manifest: backupId });
    let manifest: Manifest;
    try {
      manifest = (await readJson(store, manifestKey(plan.name, backupId))) as Manifest;
    } catch (error) {
      unreadable.push(`${backupId}: ${(error as Error).message}`);
      continue;
    }
    newestAny ??= { backupId, status: manifest.status };
    const failed = new Set(manifest.failures.map((failure) => `${failure.kind}/${failureSourceName(failure.source)}`));
    for (const artifact of manifest.artifacts) {
      const key = `${sourceKindOf(artifact.kind)}/${artifact.source}`;
      if (!failed.has(key) && !sourceTimes.has(key)) sourceTimes.set(key, { backupId, completedAt: manifest.completedAt });
    }
    if (statusInDestination(manifest) === 'complete') newestComplete = { backupId, completedAt: manifest.completedAt };
  }

  const limit = limits.maxBackupAge ? { limit: limits.maxBackupAge } : {};
  const unreadableNote = unreadable.length > 0 ? `; unreadable manifests skipped: ${unreadable.slice(0, 3).join('; ')}` : '';
  if (!newestComplete) {
    const found = newestAny ? `; the newest backup, ${newestAny.backupId}, is ${newestAny.status}` : '';
    return {
      check: {
        name,
        kind: 'backup',
        state: limits.maxBackupAge ? 'stale' : 'unknown',
        reason: `no complete backup of plan ${plan.name} in ${store.description}${found}${unreadableNote}`,
        ...limit,
      },
      sourceTimes,
    };
  }
  const ageSeconds = (now - Date.parse(newestComplete.completedAt)) / 1000;
  const { state, reason } = judgeAge(ageSeconds, limits.maxBackupAge, `newest complete backup ${newestComplete.backupId} completed`);
  const newer = newestAny && newestAny.backupId !== newestComplete.backupId ? `; newer backup ${newestAny.backupId} is ${newestAny.status}` : '';
  return {
    check: {
      name,
      kind: 'backup',
      state,
      reason: reason + newer + unreadableNote,
      time: newestComplete.completedAt,
      ageSeconds,
      backupId: newestComplete.backupId,
      ...limit,
    },
    newestComplete,
    sourceTimes,
  };
}

/**
 * Activity: checks the age of the newest complete backup in one replica of
 * the plan, as `checkStoredBackups` checks the primary's. A replica
 * that was down during the last backups contains only older ones, and
 * this check shows it. The check is named "backup <replica>".
 */
export async function checkReplicaBackups(input: { plan: Plan; replica: string }): Promise<HealthCheck[]> {
  const { plan } = input;
  const replica = (plan.replicas ?? []).find((candidate) => candidate.name === input.replica);
  if (!replica) throw new Error(`plan ${plan.name} has no replica named "${input.replica}"`);
  const store = openBlobStore(replica);
  const { sealed } = await listStoredObjects(store, plan.name);
  const { check } = await checkNewestBackup(store, plan, sealed, `backup ${replica.name}`, Date.now());
  return [check];
}

/**
 * Activity: checks the plan's stored backups and drill reports against
 * `health.maxBackupAge` and `health.maxDrillAge`. Manifests are read newest
 * first until the newest complete backup, which stores every source the
 * plan had then, so the reads stop early on a healthy plan. In the worker it
 * also sets the last success metrics from what it found, so they survive a
 * worker restart.
 */
export async function checkStoredBackups(input: { plan: Plan }): Promise<HealthCheck[]> {
  const { plan } = input;
  const limits = plan.health ?? {};
  const store = openBlobStore(plan.destination);
  const now = Date.now();
  const { sealed, drillReports } = await listStoredObjects(store, plan.name);
  const { check: backupCheck, newestComplete, sourceTimes } = await checkNewestBackup(store, plan, sealed, 'backup', now);
  const checks: HealthCheck[] = [backupCheck];

  for (const source of planSources(plan)) {
    const key = `${source.kind}/${source.name}`;
    const found = sourceTimes.get(key);
    if (!found) {
      checks.push({
        name: `source ${key}`,
        kind: 'source',
        state: limits.maxBackupAge ? 'stale' : 'unknown',
        reason: newestComplete
          ? `no backup from ${newestComplete.backupId} on stores ${key}`
          : `no backup of plan ${plan.name} stores ${key}`,
        ...(limits.maxBackupAge ? { limit: limits.maxBackupAge } : {}),
      });
      continue;
    }
    const ageSeconds = (now - Date.parse(found.completedAt)) / 1000;
    const { state, reason } = judgeAge(ageSeconds, limits.maxBackupAge, `backup ${found.backupId} stored it, completed`);
    checks.push({
      name: `source ${key}`,
      kind: 'source',
      state,
      reason,
      time: found.completedAt,
      ageSeconds,
      backupId: found.backupId,
      ...(limits.maxBackupAge ? { limit: limits.maxBackupAge } : {}),
    });
    recordSourceSuccess(plan.name, source.kind, source.name, new Date(found.completedAt));
  }

  checks.push(await checkDrills(store, plan, drillReports, now));
  return checks;
}

/**
 * Finds the newest drill report with outcome "passed". Report names start
 * with the drill's UTC start time, so reading newest first stops at the
 * first passed one.
 */
async function checkDrills(store: BlobStore, plan: Plan, reportKeys: string[], now: number): Promise<HealthCheck> {
  const limit = plan.health?.maxDrillAge;
  const byStart = reportKeys.map((key) => ({ key, stamp: key.slice(key.lastIndexOf('/') + 1) }));
  byStart.sort((a, b) => compareStrings(b.stamp, a.stamp));
  let failedNewer = 0;
  for (const { key } of byStart) {
    heartbeatIfActivity({ drillReport: key });
    let report: { outcome?: unknown; completedAt?: unknown; backupId?: unknown };
    try {
      report = (await readJson(store, key)) as typeof report;
    } catch {
      // An unreadable report proves nothing; the next older one may.
      continue;
    }
    if (report?.outcome !== 'passed' || typeof report.completedAt !== 'string') {
      failedNewer++;
      continue;
    }
    const ageSeconds = (now - Date.parse(report.completedAt)) / 1000;
    const backupId = typeof report.backupId === 'string' ? report.backupId : undefined;
    const { state, reason } = judgeAge(ageSeconds, limit, `newest passed drill (of backup ${backupId ?? 'unknown'}) completed`);
    recordDrillSuccess(plan.name, new Date(report.completedAt));
    return {
      name: 'drill',
      kind: 'drill',
      state,
      reason: failedNewer > 0 ? `${reason}; ${failedNewer} newer drill report(s) did not pass` : reason,
      time: report.completedAt,
      ageSeconds,
      ...(backupId ? { backupId } : {}),
      ...(limit ? { limit } : {}),
    };
  }
  return {
    name: 'drill',
    kind: 'drill',
    state: limit ? 'stale' : 'unknown',
    reason:
      reportKeys.length === 0
        ? `no drill report for plan ${plan.name}; run "opa-backup drill --plan FILE"`
        : `none of the ${reportKeys.length} drill report(s) of plan ${plan.name} has outcome "passed"`,
    ...(limit ? { limit } : {}),
  };
}

async function readLimited(response: IncomingMessage, what: string): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of response) {
    size += (chunk as Buffer).length;
    if (size > MAX_OPA_RESPONSE_BYTES) {
      response.destroy();
      throw new Error(`${what} is larger than ${MAX_OPA_RESPONSE_BYTES} bytes`);
    }
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks).toString('utf8');
}

/** A bundle as OPA's status API (bundles.NAME) reports it. */
interface StatusBundle {
  active_revision?: string;
  last_successful_activation?: string;
  last_successful_download?: string;
  last_successful_request?: string;
  code?: string;
  message?: string;
}

/** The bundles of one OPA: name to what it reports. */
type LoadedBundles = Map<string, { revision?: string; activatedAt?: string; fetchedAt?: string; error?: string; fromStatus: boolean }>;

/** OPA reports unset times as Go's zero time. */
function validTime(value: string | undefined): string | undefined {
  if (!value || value.startsWith('0001-01-01')) return undefined;
  return Number.isFinite(Date.parse(value)) ? value : undefined;
}

/**
 * Reads OPA's status API. Returns undefined when the status plugin is off:
 * OPA 1.22 returns 500 with "status plugin not enabled", and releases
 * without the endpoint return 404.
 */
async function readStatusBundles(connection: ReturnType<typeof connectOpa>): Promise<LoadedBundles | undefined> {
  const response = await opaRequest(connection, 'GET', 'v1/status', { acceptStatuses: (status) => status === 200 || status === 404 || status === 500 });
  const text = await readLimited(response, 'GET /v1/status');
  if (response.statusCode === 404) return undefined;
  if (response.statusCode === 500) {
    if (text.includes('status plugin not enabled')) return undefined;
    throw new Error(`GET /v1/status returned 500: ${text.trim().slice(0, 300)}`);
  }
  const body = JSON.parse(text) as { result?: { bundles?: Record<string, StatusBundle> } };
  const bundles: LoadedBundles = new Map();
  for (const [name, bundle] of Object.entries(body.result?.bundles ?? {})) {
    const fetchedAt = validTime(bundle.last_successful_request) ?? validTime(bundle.last_successful_download);
    bundles.set(name, {
      revision: bundle.active_revision || undefined,
      activatedAt: validTime(bundle.last_successful_activation),
      fetchedAt: fetchedAt ?? validTime(bundle.last_successful_activation),
      error: bundle.code ? `${bundle.code}: ${bundle.message ?? ''}`.trim() : undefined,
      fromStatus: true,
    });
  }
  return bundles;
}

/** Reads data.system.bundles: every activated bundle with its manifest's revision, bundles loaded from files included. */
async function readSystemBundles(connection: ReturnType<typeof connectOpa>): Promise<LoadedBundles> {
  const response = await opaRequest(connection, 'GET', 'v1/data/system/bundles');
  const body = JSON.parse(await readLimited(response, 'GET /v1/data/system/bundles')) as {
    result?: Record<string, { manifest?: { revision?: string } }>;
  };
  const bundles: LoadedBundles = new Map();
  for (const [name, bundle] of Object.entries(body.result ?? {})) {
    bundles.set(name, { revision: bundle.manifest?.revision || undefined, fromStatus: false });
  }
  return bundles;
}

/**
 * Activity: lists the bundles an OPA source has loaded, with revisions, and
 * checks the time since OPA last fetched each (a 304 Not Modified counts)
 * against `health.maxBundleAge`. Fetch and activation times come from OPA's
 * status API, which needs the status plugin; without it, only revisions are
 * known and the age is unknown.
 */
export async function checkOpaBundles(input: { plan: Plan; source: string }): Promise<HealthCheck[]> {
  const { plan } = input;
  const sources = plan.sources.opa ?? [];
  const index = sources.findIndex((source) => source.name === input.source);
  if (index < 0) throw new Error(`plan ${plan.name} has no OPA source "${input.source}"`);
  const limit = plan.health?.maxBundleAge;
  const now = Date.now();
  let bundles: LoadedBundles;
  let statusPlugin: boolean;
  try {
    const connection = connectOpa(sources[index], index, OPA_REQUEST_TIMEOUT_MS);
    const fromStatus = await readStatusBundles(connection);
    statusPlugin = fromStatus !== undefined;
    bundles = await readSystemBundles(connection);
    for (const [name, bundle] of fromStatus ?? []) bundles.set(name, bundle);
  } catch (error) {
    // The OPA client words its errors for snapshots; the request and the cause are what matter here.
    const message = (error as Error).message.replace(/^snapshot of OPA "[^"]*" failed: /, '');
    return [
      {
        name: `opa ${input.source}`,
        kind: 'opa',
        state: 'unknown',
        failed: true,
        reason: `cannot read the bundles of OPA "${input.source}" at ${sources[index].url}: ${message}`,
      },
    ];
  }
  if (bundles.size === 0) {
    return [{ name: `opa ${input.source}`, kind: 'opa', state: 'ok', reason: `OPA "${input.source}" has no bundle loaded; its policies come through the REST API` }];
  }

  const checks: HealthCheck[] = [];
  for (const [name, bundle] of [...bundles].sort(([a], [b]) => compareStrings(a, b))) {
    const base = {
      name: `bundle ${input.source}/${name}`,
      kind: 'bundle' as const,
      ...(bundle.revision ? { revision: bundle.revision } : {}),
      ...(bundle.activatedAt ? { activatedAt: bundle.activatedAt } : {}),
      ...(limit ? { limit } : {}),
    };
    const revision = bundle.revision ? `revision ${bundle.revision}` : 'no revision';
    const error = bundle.error ? `; OPA reports ${bundle.error}` : '';
    if (!bundle.fetchedAt) {
      const why = statusPlugin
        ? 'OPA reports no successful fetch of it'
        : "OPA's status plugin is off, so its fetch time is unknown (a bundle loaded with --bundle has none); enable `status` in OPA's configuration to check its age";
      checks.push({ ...base, state: limit ? 'unknown' : 'ok', reason: `${revision}; ${why}${error}` });
      continue;
    }
    const ageSeconds = (now - Date.parse(bundle.fetchedAt)) / 1000;
    const { state, reason } = judgeAge(ageSeconds, limit, `${revision}; last fetched`);
    checks.push({ ...base, state, reason: reason + error, time: bundle.fetchedAt, ageSeconds });
  }
  return checks;
}

/** Returns the check of a destination whose backups could not be listed or read. */
function unreadableBackups(plan: Plan, name: string, error: unknown): HealthCheck {
  return { name, kind: 'backup', state: 'unknown', failed: true, reason: `cannot read the backups of plan ${plan.name}: ${(error as Error).message}` };
}

/** Builds the report of a set of checks. */
export function healthReport(plan: string, checks: HealthCheck[], checkedAt: string, ranBy: HealthReport['ranBy']): HealthReport {
  return {
    plan,
    checkedAt,
    ranBy,
    checks,
    stale: checks.filter((check) => check.state === 'stale').map((check) => check.name),
    failed: checks.filter((check) => check.failed).map((check) => check.name),
  };
}

/** Runs every check of healthWorkflow in this process, for `opa-backup status` without Temporal. */
export async function runHealthChecks(plan: Plan): Promise<HealthReport> {
  const checkedAt = new Date().toISOString();
  const opaChecks = (plan.sources.opa ?? []).map((source) => checkOpaBundles({ plan, source: source.name }));
  const stored = checkStoredBackups({ plan }).catch((error: unknown): HealthCheck[] => [unreadableBackups(plan, 'backup', error)]);
  const replicas = (plan.replicas ?? []).map((replica) =>
    checkReplicaBackups({ plan, replica: replica.name }).catch((error: unknown): HealthCheck[] => [unreadableBackups(plan, `backup ${replica.name}`, error)]),
  );
  const results = await Promise.all([stored, ...replicas, ...opaChecks]);
  return healthReport(plan.name, results.flat(), checkedAt, 'local');
}
