// Benchmark of the OPA snapshot as the worker runs it: snapshotOpa, then
// packBundle (gzip level 1), then a put to a LocalBlobStore. It compares the
// wall time against plain curl reads of GET /v1/data and GET /v1/policies on
// the same OPA, and reads the peak RSS of the snapshot from a child Node
// process that does nothing else.
//
//   npx tsc -p . && node dist/bench/opa-snapshot.js [--megabytes 50] [--runs 3]
//
// It exits 0 whatever the verdict, because it is a measurement, not a test.
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { DigestStream } from '../activities/digest';
import { packBundle } from '../activities/opa/bundle';
import { connectOpa } from '../activities/opa/client';
import { policyFiles, snapshotOpa } from '../activities/opa/snapshot';
import { LocalBlobStore } from '../activities/storage/local';
import { startOpa, type OpaServer } from '../test/harness/opa';
import { tool } from '../test/harness/tools';

/** The snapshot may take at most this many times as long as the two curl reads. */
const MAX_TIME_RATIO = 1.5;
/** Peak RSS limit of the process that takes the snapshot, in MB (10^6 bytes). */
const MAX_PEAK_RSS_MB = 300;
/** Same level as BUNDLE_GZIP_LEVEL in activities/backup.ts. */
const BUNDLE_GZIP_LEVEL = 1;
const MEGABYTE = 1_000_000;

/** One line of JSON that the child process prints on stdout. */
interface ChildResult {
  snapshotSeconds: number;
  bundleSeconds: number;
  totalSeconds: number;
  dataBytes: number;
  bundleBytes: number;
  maxRssBytes: number;
}

// ---------------------------------------------------------------------------
// Deterministic test data
// ---------------------------------------------------------------------------

/** mulberry32: a small seeded PRNG, so every run loads the same documents. */
function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const FIRST_NAMES = ['Ada', 'Grace', 'Alan', 'Barbara', 'Edsger', 'Frances', 'Ken', 'Radia', 'Linus', 'Margaret', 'Donald', 'Sophie'];
const LAST_NAMES = ['Lovelace', 'Hopper', 'Turing', 'Liskov', 'Dijkstra', 'Allen', 'Thompson', 'Perlman', 'Torvalds', 'Hamilton', 'Knuth', 'Wilson'];
const DEPARTMENTS = ['engineering', 'finance', 'legal', 'sales', 'support', 'research', 'operations', 'security'];
const REGIONS = ['eu-west-1', 'eu-central-1', 'us-east-1', 'us-west-2', 'ap-southeast-2'];
const ACTIONS = ['read', 'write', 'delete', 'approve', 'export', 'share'];
const RESOURCE_KINDS = ['invoice', 'report', 'repository', 'dataset', 'ticket', 'contract'];
const CURRENCIES = ['EUR', 'USD', 'GBP', 'JPY', 'CHF'];
const ROLE_COUNT = 200;

/** Base documents as JSON text, with the data path each one is PUT to. */
interface DataDocument {
  path: string;
  json: string;
}

function pick<T>(random: () => number, values: readonly T[]): T {
  return values[Math.floor(random() * values.length)];
}

/** Formats a random decimal with exactly `places` fraction digits as JSON text ("84123.50"). */
function decimalText(random: () => number, integerDigits: number, places: number): string {
  const integer = Math.floor(random() * 10 ** integerDigits);
  const fraction = String(Math.floor(random() * 10 ** places)).padStart(places, '0');
  return `${integer}.${fraction}`;
}

function userId(index: number): string {
  return `u${String(index).padStart(7, '0')}`;
}

/**
 * Builds a JSON object of `targetBytes` or a little more, one member per
 * call of `member(index)`, so no intermediate JavaScript object is needed.
 */
function objectOfSize(targetBytes: number, member: (index: number) => [string, string]): { json: string; count: number } {
  const parts: string[] = [];
  let bytes = 2;
  let index = 0;
  while (bytes < targetBytes) {
    const [key, value] = member(index);
    const text = `${JSON.stringify(key)}:${value}`;
    parts.push(text);
    bytes += text.length + 1;
    index++;
  }
  return { json: `{${parts.join(',')}}`, count: index };
}

/**
 * Generates about `totalBytes` of base documents under data.acme (users,
 * roles, grants), data.billing.accounts and data.config. Identifiers above
 * 2^53 and decimals with trailing zeros are written as JSON text, because
 * a snapshot must return them exactly as OPA stored them.
 */
function generateData(totalBytes: number): DataDocument[] {
  const random = seededRandom(20240601);
  const roles = Array.from({ length: ROLE_COUNT }, (_, index) => `role-${String(index).padStart(3, '0')}`);

  const roleMembers: string[] = roles.map((role) => {
    const permissions = Array.from({ length: 3 + Math.floor(random() * 5) }, () => ({
      resource: pick(random, RESOURCE_KINDS),
      actions: ACTIONS.filter(() => random() < 0.4),
    }));
    return `${JSON.stringify(role)}:${JSON.stringify({ description: `Role ${role} for ${pick(random, DEPARTMENTS)}`, permissions })}`;
  });
  const rolesDocument = `{${roleMembers.join(',')}}`;

  const users = objectOfSize(totalBytes * 0.4, (index) => {
    const first = pick(random, FIRST_NAMES);
    const last = pick(random, LAST_NAMES);
    const employeeNumber = 9007199254740993n + BigInt(index) * 7n;
    const tags = ['staff', pick(random, DEPARTMENTS)];
    if (random() < 0.02) tags.push('admin');
    const value =
      `{"name":${JSON.stringify(`${first} ${last}`)},` +
      `"email":${JSON.stringify(`${first}.${last}.${index}@example.com`.toLowerCase())},` +
      `"department":${JSON.stringify(pick(random, DEPARTMENTS))},` +
      `"manager":${JSON.stringify(userId(Math.floor(random() * Math.max(index, 1))))},` +
      `"employee_number":${employeeNumber},` +
      `"salary":${decimalText(random, 5, 2)},` +
      `"active":${random() < 0.95},` +
      `"tags":${JSON.stringify(tags)},` +
      `"attributes":{"clearance":${Math.floor(random() * 5)},"region":${JSON.stringify(pick(random, REGIONS))},` +
      `"cost_center":"CC-${Math.floor(random() * 10000)}","score":${random().toFixed(6)}}}`;
    return [userId(index), value];
  });

  const grants = objectOfSize(totalBytes * 0.45, (index) => {
    const grantedAtNanoseconds = 1700000000000000000n + BigInt(index) * 1_000_003n;
    const value =
      `{"user":${JSON.stringify(userId(Math.floor(random() * users.count)))},` +
      `"role":${JSON.stringify(pick(random, roles))},` +
      `"resource":${JSON.stringify(`${pick(random, RESOURCE_KINDS)}/${Math.floor(random() * 100000)}`)},` +
      `"granted_at_ns":${grantedAtNanoseconds},` +
      `"weight":${decimalText(random, 1, 8)},` +
      `"conditions":{"region":${JSON.stringify(pick(random, REGIONS))},"max_amount":${decimalText(random, 7, 2)},` +
      `"requires_mfa":${random() < 0.3}}}`;
    return [`g${String(index).padStart(8, '0')}`, value];
  });

  const remaining = totalBytes - users.json.length - grants.json.length - rolesDocument.length;
  const accounts = objectOfSize(Math.max(remaining, 0), (index) => {
    const value =
      `{"owner":${JSON.stringify(userId(Math.floor(random() * users.count)))},` +
      `"currency":${JSON.stringify(pick(random, CURRENCIES))},` +
      `"balance":${decimalText(random, 12, 4)},` +
      `"ledger_id":${123456789012345678901234567890n + BigInt(index)},` +
      `"limits":{"daily":${decimalText(random, 6, 2)},"monthly":${decimalText(random, 8, 2)},"rate":1e-7}}`;
    return [`acct-${String(index).padStart(7, '0')}`, value];
  });

  const config = JSON.stringify({ feature_flags: { audit: true, strict_mode: false }, schema_version: 3, timeout_seconds: 2.5 });

  return [
    { path: 'acme/roles', json: rolesDocument },
    { path: 'acme/users', json: users.json },
    { path: 'acme/grants', json: grants.json },
    { path: 'billing/accounts', json: accounts.json },
    { path: 'config', json: config },
  ];
}

/**
 * Policies in Rego v1. acme.authz, acme.admin, billing.limits and
 * config.defaults put rules under packages that also hold base documents,
 * which the snapshot has to cut out.
 * Every rule depends on input, so GET /v1/data evaluates them cheaply and the
 * curl reference is not slowed down by rule evaluation.
 */
const POLICIES: Record<string, string> = {
  'acme/authz.rego': `package acme.authz

default allow := false

allow if {
	user := data.acme.users[input.user]
	user.active
	some grant_id in input.grants
	grant := data.acme.grants[grant_id]
	grant.user == input.user
	some permission in data.acme.roles[grant.role].permissions
	permission.resource == input.resource_kind
	input.action in permission.actions
}
`,
  'acme/admin.rego': `package acme.admin

is_admin if "admin" in data.acme.users[input.user].tags
`,
  'billing/limits.rego': `package billing.limits

over_daily_limit if {
	account := data.billing.accounts[input.account]
	input.amount > account.limits.daily
}
`,
  'httpapi/authz.rego': `package httpapi.authz

default allow := false

allow if {
	input.method == "GET"
	input.path[0] == "health"
}
`,
  'config/defaults.rego': `package config.defaults

timeout_seconds := object.get(input, "timeout_seconds", 2.5)
`,
};

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

function runCurl(url: string): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(tool('curl'), ['-s', '-f', '-o', '/dev/null', url], (error) => {
      if (error) reject(new Error(`curl ${url} failed: ${error.message}`));
      else resolve();
    });
  });
}

/** Seconds that curl takes for GET /v1/data followed by GET /v1/policies. */
async function timeCurlReads(baseUrl: string): Promise<number> {
  const start = performance.now();
  await runCurl(`${baseUrl}/v1/data`);
  await runCurl(`${baseUrl}/v1/policies`);
  return (performance.now() - start) / 1000;
}

/** Runs one snapshot in a child Node process and returns the result line it prints. */
function runChildSnapshot(baseUrl: string, storeDirectory: string): Promise<ChildResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [__filename, '--child', '--url', baseUrl, '--store', storeDirectory], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let output = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (text: string) => {
      output += text;
    });
    child.on('error', reject);
    child.on('exit', (code) => {
      if (code !== 0) {
        reject(new Error(`snapshot child process exited with code ${code}; output: ${output.slice(0, 500)}`));
        return;
      }
      try {
        resolve(JSON.parse(output.trim().split('\n').pop() ?? '') as ChildResult);
      } catch {
        reject(new Error(`snapshot child process printed no result line; output: ${output.slice(0, 500)}`));
      }
    });
  });
}

/** Child mode: takes one snapshot the way snapshotOpaSource does, then prints a ChildResult. */
async function childMain(baseUrl: string, storeDirectory: string): Promise<void> {
  const workDirectory = await mkdtemp(path.join(tmpdir(), 'opa-backup-bench-'));
  const dataFile = path.join(workDirectory, 'data.json');
  const connection = connectOpa({ name: 'bench', url: baseUrl }, 0);
  try {
    const start = performance.now();
    const snapshot = await snapshotOpa(connection, { probes: [], dataFile });
    const snapshotEnd = performance.now();

    const policies = policyFiles(snapshot.modules);
    const bundle = packBundle({
      revision: 'bench/opa-snapshot',
      regoVersion: snapshot.regoVersion,
      modules: snapshot.modules,
      policies,
      dataFile,
      gzipLevel: BUNDLE_GZIP_LEVEL,
      metadata: { opa_backup: { plan: 'bench', source: 'bench' } },
    });
    const hasher = new DigestStream();
    bundle.stream.on('error', (error) => hasher.destroy(error));
    bundle.stream.pipe(hasher);
    const store = new LocalBlobStore(storeDirectory);
    const { size } = await store.put('bench/opa/bench.tar.gz', hasher, { contentType: 'application/gzip' });
    hasher.digest();
    await bundle.dataSha256;
    const end = performance.now();

    const result: ChildResult = {
      snapshotSeconds: (snapshotEnd - start) / 1000,
      bundleSeconds: (end - snapshotEnd) / 1000,
      totalSeconds: (end - start) / 1000,
      dataBytes: snapshot.dataBytes,
      bundleBytes: size,
      // resourceUsage().maxRSS is in kilobytes (KiB on Linux).
      maxRssBytes: process.resourceUsage().maxRSS * 1024,
    };
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    connection.agent.destroy();
    await rm(workDirectory, { recursive: true, force: true });
  }
}

function formatTable(rows: Array<[string, string]>): string {
  const width = Math.max(...rows.map(([label]) => label.length));
  return rows.map(([label, value]) => `${label.padEnd(width)}  ${value}`).join('\n');
}

async function loadOpa(opa: OpaServer, megabytes: number): Promise<number> {
  const documents = generateData(megabytes * MEGABYTE);
  let loadedBytes = 0;
  for (const document of documents) {
    await opa.putData(document.path, document.json);
    loadedBytes += Buffer.byteLength(document.json);
  }
  for (const [id, text] of Object.entries(POLICIES)) await opa.putPolicy(id, text);
  return loadedBytes;
}

async function parentMain(megabytes: number, runs: number): Promise<void> {
  const opa = await startOpa('bench-opa-snapshot');
  const storeDirectory = await mkdtemp(path.join(tmpdir(), 'opa-backup-bench-store-'));
  try {
    console.log(`OPA at ${opa.url}: loading about ${megabytes} MB of base documents and ${Object.keys(POLICIES).length} policies`);
    const loadedBytes = await loadOpa(opa, megabytes);
    const loadBefore = loadavg()[0];

    // One untimed read of each kind, so neither side pays for a cold start.
    await timeCurlReads(opa.url);
    await runChildSnapshot(opa.url, storeDirectory);

    const curlSeconds: number[] = [];
    const snapshots: ChildResult[] = [];
    for (let run = 1; run <= runs; run++) {
      curlSeconds.push(await timeCurlReads(opa.url));
      snapshots.push(await runChildSnapshot(opa.url, storeDirectory));
      const last = snapshots[snapshots.length - 1];
      console.log(
        `run ${run}: curl ${curlSeconds[run - 1].toFixed(3)} s, snapshot ${last.totalSeconds.toFixed(3)} s ` +
          `(data ${last.snapshotSeconds.toFixed(3)} s, bundle and store ${last.bundleSeconds.toFixed(3)} s), ` +
          `peak RSS ${(last.maxRssBytes / MEGABYTE).toFixed(1)} MB`,
      );
    }

    const curlMedian = median(curlSeconds);
    const snapshotMedian = median(snapshots.map((result) => result.totalSeconds));
    const ratio = snapshotMedian / curlMedian;
    const peakRssMegabytes = Math.max(...snapshots.map((result) => result.maxRssBytes)) / MEGABYTE;
    const ratioPass = ratio <= MAX_TIME_RATIO;
    const rssPass = peakRssMegabytes <= MAX_PEAK_RSS_MB;

    console.log('');
    console.log(
      formatTable([
        ['data loaded (PUT bodies)', `${(loadedBytes / MEGABYTE).toFixed(1)} MB`],
        ['data.json in bundle', `${(snapshots[0].dataBytes / MEGABYTE).toFixed(1)} MB`],
        ['bundle (gzip level 1)', `${(snapshots[0].bundleBytes / MEGABYTE).toFixed(1)} MB`],
        [`curl, median of ${runs}`, `${curlMedian.toFixed(3)} s`],
        [`snapshot, median of ${runs}`, `${snapshotMedian.toFixed(3)} s`],
        ['  of which data query + spool', `${median(snapshots.map((result) => result.snapshotSeconds)).toFixed(3)} s`],
        ['  of which bundle + store put', `${median(snapshots.map((result) => result.bundleSeconds)).toFixed(3)} s`],
        ['ratio', `${ratio.toFixed(2)} (target <= ${MAX_TIME_RATIO}) ${ratioPass ? 'PASS' : 'FAIL'}`],
        ['peak RSS (max of runs)', `${peakRssMegabytes.toFixed(1)} MB (target <= ${MAX_PEAK_RSS_MB}) ${rssPass ? 'PASS' : 'FAIL'}`],
        // Other processes on the machine slow down both sides, so the load average shows how noisy the run was.
        ['1-minute load average', `${loadBefore.toFixed(2)} before the runs, ${loadavg()[0].toFixed(2)} after`],
      ]),
    );
    console.log(`\nverdict: ${ratioPass && rssPass ? 'PASS' : 'FAIL'}`);
  } finally {
    await opa.stop();
    await rm(storeDirectory, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      megabytes: { type: 'string', default: '50' },
      runs: { type: 'string', default: '3' },
      child: { type: 'boolean', default: false },
      url: { type: 'string' },
      store: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    console.log(
      'usage: node dist/bench/opa-snapshot.js [--megabytes N] [--runs N]\n' +
        '  --megabytes N  size of the generated base documents in MB (10^6 bytes), default 50\n' +
        '  --runs N       timed runs of each side; the medians are compared, default 3',
    );
    return;
  }
  if (values.child) {
    if (!values.url || !values.store) throw new Error('missing --url or --store: --child requires both');
    await childMain(values.url, values.store);
    return;
  }
  const megabytes = Number(values.megabytes);
  const runs = Number(values.runs);
  if (!Number.isFinite(megabytes) || megabytes <= 0) throw new Error(`invalid --megabytes "${values.megabytes}": expected a positive number`);
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`invalid --runs "${values.runs}": expected a positive integer`);
  await parentMain(megabytes, runs);
}

main().catch((error: unknown) => {
  console.error(error instanceof Error ? error.message : error);
  process.exit(1);
});
