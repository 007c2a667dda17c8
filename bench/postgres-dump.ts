// Benchmark of dumpDatabase (activities/postgres/dump.ts) against plain
// `pg_dump -Fc` on pgbench databases, in the same run on the same server.
//
// The server comes from test/harness/postgres.ts, so its cluster lives in
// /dev/shm when that has 1 GiB free, else in /tmp, and runs with fsync off.
// For each scale, `pgbench -i -s SCALE` fills one database (scale 7 is about
// 120 MB, scale 70 about 1.1 GB). Five measurements then alternate, three
// runs each by default, and the tables show their medians:
//
// - `pg_dump -Fc DB > /dev/null`, the reference that writes nothing.
// - `pg_dump -Fc DB > FILE`, which writes a file in the store folder
//   (default /tmp, on disk) without fsync. The fsync after it is timed apart.
// - dumpDatabase into a LocalBlobStore in the store folder, in a child Node
//   process, so that process.resourceUsage().maxRSS is that of the dump
//   alone. Its time is measured inside the child around the call. It leaves
//   out Node's start-up but includes the version check, the row counts, the
//   SHA-256 digest and the fsync that LocalBlobStore does.
// - `pipe` and `digest-store` children, which run plain pg_dump into Node
//   with no snapshot or row counts, to split the streaming cost of
//   dumpDatabase from that of counting.
//
// pg_dump connects with PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE in
// its environment in every case, so no password appears on a command line.
//
// NOTE: pgbench_accounts is mostly blank padding, so the archive is about 2%
// of the database size (20 MB at scale 70). The digest and the write
// therefore cost far less here than for data that compresses worse.
//
//   npx tsc -p . && node dist/bench/postgres-dump.js [--scales 7,70] [--runs 3] [--directory /tmp]
//
// It exits 0 whatever the verdict, because it is a measurement, not a test.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, createReadStream, fsyncSync, mkdtempSync, openSync, rmSync, statfsSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { parseArgs } from 'node:util';
import { DigestStream } from '../activities/digest';
import { dumpDatabase, type DumpProgress } from '../activities/postgres/dump';
import { ArtifactStore } from '../activities/artifacts';
import { generateIdentity, parseRecipient } from '../activities/crypto/age';
import { LocalBlobStore } from '../activities/storage/local';
import { startPostgres, type PostgresServer } from '../test/harness/postgres';
import { tool } from '../test/harness/tools';

/** dumpDatabase may take at most this multiple of the time of `pg_dump -Fc > /dev/null`. */
const MAX_TIME_RATIO = 1.15;
/** Peak RSS limit of the Node process that runs dumpDatabase, in MB (10^6 bytes). */
const MAX_PEAK_RSS_MB = 200;
const MEGABYTE = 1_000_000;
/** Rows that `pgbench -i` puts in pgbench_accounts per unit of scale. */
const ACCOUNTS_PER_SCALE = 100_000;
/**
 * Estimated bytes per unit of scale of a pgbench database with its indexes,
 * used only to check free space before starting. PostgreSQL 15.18 measured
 * 1105 MB at scale 70, which is 15.8 MB per unit.
 */
const ESTIMATED_BYTES_PER_SCALE = 16 * MEGABYTE;

/** One line of JSON that the child process prints on stdout. */
interface ChildResult {
  /** Wall time of the dumpDatabase call. */
  seconds: number;
  /** From the call to the first `count` progress report: version check, connection, snapshot export. */
  setupSeconds: number;
  /** From the first `count` report to the `dump` report: the row counts. */
  countSeconds: number;
  /** From the `dump` report to the return: pg_dump, digest, write, fsync and rename. */
  dumpSeconds: number;
  /** CPU time of the child process during the call. */
  cpuUserSeconds: number;
  cpuSystemSeconds: number;
  /** process.resourceUsage().maxRSS in bytes, read right after the call. */
  maxRssBytes: number;
  size: number;
  sha256: string;
  accountRows: number;
  /** Time to compute SHA-256 over the stored archive again, read from the page cache. */
  rehashSeconds: number;
}

// ---------------------------------------------------------------------------
// Child process: one dumpDatabase call, then its peak RSS
// ---------------------------------------------------------------------------

async function runChild(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      child: { type: 'string' },
      url: { type: 'string' },
      database: { type: 'string' },
      store: { type: 'string' },
      key: { type: 'string' },
      'pg-bin': { type: 'string' },
    },
  });
  // The parent passes the password in PGPASSWORD, never on a command line.
  const password = process.env.PGPASSWORD;
  if (password === undefined) throw new Error('missing PGPASSWORD in the environment of the child process');
  if (values.child === 'pipe' || values.child === 'digest-store') {
    await runStreamChild(values.child, values.store as string, values.key as string, values['pg-bin'] as string);
    return;
  }
  if (values.child !== 'dump') throw new Error(`invalid child operation "${values.child}"; expected dump, pipe or digest-store`);
  // With --encrypt, the archive goes through the same age encryption as a
  // backup's artifacts (pg_dump -Fc output is not gzipped again).
  const recipient = process.env.BENCH_AGE_RECIPIENT;
  const store = recipient
    ? new ArtifactStore(new LocalBlobStore(values.store as string), { encrypt: { recipients: [parseRecipient(recipient)] } })
    : new LocalBlobStore(values.store as string);

  const phaseStarts = new Map<string, number>();
  const onProgress = (progress: DumpProgress): void => {
    if (!phaseStarts.has(progress.phase)) phaseStarts.set(progress.phase, performance.now());
  };
  const cpuBefore = process.cpuUsage();
  const started = performance.now();
  const result = await dumpDatabase({
    url: values.url as string,
    password,
    source: 'bench',
    database: values.database as string,
    store,
    key: values.key as string,
    pgBinDirectory: values['pg-bin'],
    onProgress,
  });
  const finished = performance.now();
  const cpu = process.cpuUsage(cpuBefore);
  // maxRSS is in KiB on Linux. It is read before the rehash below, which
  // would not raise it anyway because it streams.
  const maxRssBytes = process.resourceUsage().maxRSS * 1024;

  const countStart = phaseStarts.get('count') ?? phaseStarts.get('dump') ?? started;
  const dumpStart = phaseStarts.get('dump') ?? finished;

  const rehashStarted = performance.now();
  const hash = createHash('sha256');
  const encoded = store instanceof ArtifactStore ? store.encoded(values.key as string) : undefined;
  const storedKey = encoded?.key ?? (values.key as string);
  for await (const chunk of createReadStream(path.join(values.store as string, ...storedKey.split('/')))) {
    hash.update(chunk as Buffer);
  }
  const rehashSeconds = (performance.now() - rehashStarted) / 1000;
  if (hash.digest('hex') !== (encoded?.sha256 ?? result.sha256)) throw new Error(`SHA-256 of the stored archive differs from the digest the store recorded`);
  if (encoded && encoded.plaintext.sha256 !== result.sha256) throw new Error('the plaintext digest of the encrypted archive differs from the digest dumpDatabase returned');

  const accounts = result.tables.find((table) => table.schema === 'public' && table.name === 'pgbench_accounts');
  const output: ChildResult = {
    seconds: (finished - started) / 1000,
    setupSeconds: (countStart - started) / 1000,
    countSeconds: (dumpStart - countStart) / 1000,
    dumpSeconds: (finished - dumpStart) / 1000,
    cpuUserSeconds: cpu.user / 1e6,
    cpuSystemSeconds: cpu.system / 1e6,
    maxRssBytes,
    size: result.size,
    sha256: result.sha256,
    accountRows: accounts?.rows ?? -1,
    rehashSeconds,
  };
  process.stdout.write(`${JSON.stringify(output)}\n`);
}

/** One line of JSON that a `pipe` or `digest-store` child prints on stdout. */
interface StreamChildResult {
  seconds: number;
  maxRssBytes: number;
}

/**
 * Runs plain `pg_dump -Fc` (no snapshot, no row counts) with its stdout piped
 * into this process. `pipe` discards the bytes, which measures the pipe alone.
 * `digest-store` sends them through DigestStream into LocalBlobStore.put as
 * dumpDatabase does, which adds the digest, the write and the fsync.
 */
async function runStreamChild(mode: 'pipe' | 'digest-store', storeRoot: string, key: string, pgBin: string): Promise<void> {
  const started = performance.now();
  // The parent sets PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE.
  const child = spawn(path.join(pgBin, 'pg_dump'), ['--format=custom', '--no-password'], { stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = new Promise<void>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (code, signal) => (code === 0 ? resolve() : reject(new Error(`pg_dump ${signal ? `was killed by ${signal}` : `exited with status ${code}`}`))));
  });
  if (mode === 'pipe') {
    await pipeline(child.stdout, new Writable({ write: (_chunk, _encoding, callback) => callback() }));
  } else {
    const hasher = new DigestStream();
    child.stdout.pipe(hasher);
    await new LocalBlobStore(storeRoot).put(key, hasher);
    hasher.digest();
  }
  await exited;
  const result: StreamChildResult = { seconds: (performance.now() - started) / 1000, maxRssBytes: process.resourceUsage().maxRSS * 1024 };
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

// ---------------------------------------------------------------------------
// Parent process

// ---------------------------------------------------------------------------

/** Runs a command with stdout sent to `stdoutFile` (a shell's `> FILE`) and returns its wall time; throws when it fails. */
function timeToFile(command: string, args: string[], environment: NodeJS.ProcessEnv, stdoutFile: string): Promise<number> {
  const descriptor = openSync(stdoutFile, 'w');
  return new Promise<number>((resolve, reject) => {
    const started = performance.now();
    const child = spawn(command, args, { env: environment, stdio: ['ignore', descriptor, 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (data: Buffer) => (stderr += data.toString()));
    child.once('error', reject);
    child.once('close', (code, signal) => {
      const seconds = (performance.now() - started) / 1000;
      if (code === 0) resolve(seconds);
      else reject(new Error(`${command} ${args.join(' ')} ${signal ? `was killed by ${signal}` : `exited with status ${code}`}: ${stderr.trim()}`));
    });
  }).finally(() => closeSync(descriptor));
}

/** Runs a command with piped output and returns its wall time and stdout; throws when it fails. */
function timeCommand(command: string, args: string[], environment: NodeJS.ProcessEnv): Promise<{ seconds: number; stdout: string }> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawn(command, args, { env: environment, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (data: Buffer) => (stdout += data.toString()));
    child.stderr.on('data', (data: Buffer) => (stderr += data.toString()));
    child.once('error', reject);
    child.once('close', (code, signal) => {
      const seconds = (performance.now() - started) / 1000;
      if (code === 0) resolve({ seconds, stdout });
      else reject(new Error(`${path.basename(command)} ${signal ? `was killed by ${signal}` : `exited with status ${code}`}: ${stderr.trim()}`));
    });
  });
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

function freeBytes(directory: string): number {
  const info = statfsSync(directory);
  return info.bavail * info.bsize;
}

function formatMegabytes(bytes: number): string {
  return `${(bytes / MEGABYTE).toFixed(0)} MB`;
}

function formatLoad(): string {
  return os
    .loadavg()
    .map((load) => load.toFixed(2))
    .join(' ');
}

function verdict(pass: boolean): string {
  return pass ? 'PASS' : 'FAIL';
}

function parseScales(text: string): number[] {
  const scales = text.split(',').map((part) => Number(part.trim()));
  if (scales.length === 0 || scales.some((scale) => !Number.isInteger(scale) || scale < 1)) {
    throw new Error(`--scales must be a comma-separated list of positive integers (pgbench scale factors), got "${text}"`);
  }
  return scales;
}

interface ScaleResult {
  scale: number;
  databaseBytes: number;
  nullSeconds: number[];
  fileSeconds: number[];
  fileFsyncSeconds: number[];
  fileBytes: number;
  children: ChildResult[];
  /** `pipe` children: plain pg_dump piped into Node and discarded. */
  pipes: StreamChildResult[];
  /** `digest-store` children: plain pg_dump piped through DigestStream into LocalBlobStore. */
  digestStores: StreamChildResult[];
}

/** Runs a child of this script and returns the JSON line it prints last. */
async function runChildScript<Result>(mode: string, args: string[], environment: NodeJS.ProcessEnv): Promise<Result> {
  const { stdout } = await timeCommand(process.execPath, [__filename, '--child', mode, ...args], environment);
  return JSON.parse(stdout.trim().split('\n').at(-1) as string) as Result;
}

/**
 * Runs the measurements on one pgbench database, alternating, `runs` times
 * each: the two pg_dump references, dumpDatabase, and the `pipe` and
 * `digest-store` children that split dumpDatabase's streaming cost.
 */
async function measureScale(
  server: PostgresServer,
  scale: number,
  runs: number,
  storeRoot: string,
  pgBin: string,
): Promise<ScaleResult> {
  const database = `pgbench_scale_${scale}`;
  await server.psql('postgres', `CREATE DATABASE ${database}`);
  console.log(`\nscale ${scale}: pgbench -i -s ${scale} into database ${database}...`);
  const environment: NodeJS.ProcessEnv = {
    ...server.clientEnvironment,
    PGDATABASE: database,
    PGSSLMODE: 'disable',
    ...(process.env.BENCH_AGE_RECIPIENT ? { BENCH_AGE_RECIPIENT: process.env.BENCH_AGE_RECIPIENT } : {}),
  };
  const initialize = await timeCommand(tool('pgbench'), ['-i', '-q', '-s', String(scale)], environment);
  const databaseBytes = Number((await server.psql('postgres', `SELECT pg_database_size('${database}')`)).trim());
  console.log(`scale ${scale}: pgbench -i took ${initialize.seconds.toFixed(1)} s; pg_database_size = ${formatMegabytes(databaseBytes)}`);

  const pgDump = path.join(pgBin, 'pg_dump');
  const dumpArguments = ['--format=custom', '--no-password'];
  const referenceFile = path.join(storeRoot, `reference-scale-${scale}.dump`);
  const store = path.join(storeRoot, 'store');
  const key = `bench/scale-${scale}.dump`;

  // One untimed pass, so that the first timed run does not pay for cold caches alone.
  await timeToFile(pgDump, dumpArguments, environment, '/dev/null');

  const result: ScaleResult = {
    scale,
    databaseBytes,
    nullSeconds: [],
    fileSeconds: [],
    fileFsyncSeconds: [],
    fileBytes: 0,
    children: [],
    pipes: [],
    digestStores: [],
  };
  const childArguments = ['--url', server.url, '--database', database, '--store', store, '--key', key, '--pg-bin', pgBin];
  for (let run = 1; run <= runs; run++) {
    const nullSeconds = await timeToFile(pgDump, dumpArguments, environment, '/dev/null');
    result.nullSeconds.push(nullSeconds);

    const fileSeconds = await timeToFile(pgDump, dumpArguments, environment, referenceFile);
    const fsyncStarted = performance.now();
    const descriptor = openSync(referenceFile, 'r');
    try {
      fsyncSync(descriptor);
    } finally {
      closeSync(descriptor);
    }
    result.fileFsyncSeconds.push((performance.now() - fsyncStarted) / 1000);
    result.fileSeconds.push(fileSeconds);
    result.fileBytes = statSync(referenceFile).size;
    rmSync(referenceFile, { force: true });

    const child = await runChildScript<ChildResult>('dump', childArguments, environment);
    result.children.push(child);
    rmSync(store, { recursive: true, force: true });

    const pipe = await runChildScript<StreamChildResult>('pipe', childArguments, environment);
    result.pipes.push(pipe);
    const digestStore = await runChildScript<StreamChildResult>('digest-store', childArguments, environment);
    result.digestStores.push(digestStore);
    rmSync(store, { recursive: true, force: true });

    console.log(
      `scale ${scale} run ${run}: pg_dump > /dev/null ${nullSeconds.toFixed(2)} s, pg_dump > file ${fileSeconds.toFixed(2)} s ` +
        `(+ fsync ${result.fileFsyncSeconds.at(-1)!.toFixed(2)} s), dumpDatabase ${child.seconds.toFixed(2)} s ` +
        `(setup ${child.setupSeconds.toFixed(2)}, count ${child.countSeconds.toFixed(2)}, dump+store ${child.dumpSeconds.toFixed(2)}; ` +
        `child CPU ${(child.cpuUserSeconds + child.cpuSystemSeconds).toFixed(2)} s; peak RSS ${formatMegabytes(child.maxRssBytes)}), ` +
        `pg_dump | node ${pipe.seconds.toFixed(2)} s, pg_dump | digest + store ${digestStore.seconds.toFixed(2)} s`,
    );
  }

  const expectedAccounts = scale * ACCOUNTS_PER_SCALE;
  for (const child of result.children) {
    if (child.accountRows !== expectedAccounts) {
      throw new Error(`dumpDatabase counted ${child.accountRows} rows in pgbench_accounts at scale ${scale}, expected ${expectedAccounts}`);
    }
  }
  return result;
}

function printResults(results: ScaleResult[]): void {
  console.log('');
  console.log('database   pg_dump>null s   pg_dump>file s   dumpDatabase s   ratio/null   ratio/file   peak RSS MB');
  for (const result of results) {
    const nullSeconds = median(result.nullSeconds);
    const fileSeconds = median(result.fileSeconds);
    const oursSeconds = median(result.children.map((child) => child.seconds));
    const peakRss = Math.max(...result.children.map((child) => child.maxRssBytes));
    console.log(
      `${formatMegabytes(result.databaseBytes).padStart(8)} ${nullSeconds.toFixed(2).padStart(16)} ${fileSeconds.toFixed(2).padStart(16)} ` +
        `${oursSeconds.toFixed(2).padStart(16)} ${(oursSeconds / nullSeconds).toFixed(3).padStart(12)} ` +
        `${(oursSeconds / fileSeconds).toFixed(3).padStart(12)} ${(peakRss / MEGABYTE).toFixed(1).padStart(13)}`,
    );
  }
  console.log('(medians; peak RSS is the maximum over the runs; MB = 10^6 bytes)');
  console.log('(dumpDatabase writes to disk and fsyncs; pg_dump>null writes nothing; pg_dump>file writes to the same folder without fsync)');

  console.log('');
  console.log('where dumpDatabase spends its time (medians, seconds):');
  console.log('database   setup   count   dump+store   pg_dump|node   pg_dump|digest+store   child CPU   rehash   archive MB   pg_dump archive MB');
  for (const result of results) {
    const children = result.children;
    const pick = (select: (child: ChildResult) => number): string => median(children.map(select)).toFixed(2);
    console.log(
      `${formatMegabytes(result.databaseBytes).padStart(8)} ${pick((child) => child.setupSeconds).padStart(7)} ` +
        `${pick((child) => child.countSeconds).padStart(7)} ${pick((child) => child.dumpSeconds).padStart(12)} ` +
        `${median(result.pipes.map((pipe) => pipe.seconds)).toFixed(2).padStart(14)} ` +
        `${median(result.digestStores.map((digestStore) => digestStore.seconds)).toFixed(2).padStart(22)} ` +
        `${pick((child) => child.cpuUserSeconds + child.cpuSystemSeconds).padStart(11)} ${pick((child) => child.rehashSeconds).padStart(8)} ` +
        `${(children[0].size / MEGABYTE).toFixed(1).padStart(12)} ${(result.fileBytes / MEGABYTE).toFixed(1).padStart(20)}`,
    );
  }
  console.log('(setup: pg_dump --version, connection, snapshot export; count: count(*) of every table;');
  console.log(' dump+store: pg_dump --snapshot through the SHA-256 digest into LocalBlobStore, including its fsync and rename;');
  console.log(' pg_dump|node: plain pg_dump piped into a Node child that discards it, from spawn to exit;');
  console.log(' pg_dump|digest+store: the same through DigestStream into LocalBlobStore.put, without snapshot or row counts;');
  console.log(' child CPU: user + system CPU of the dumpDatabase child during the call;');
  console.log(` rehash: SHA-256 of the stored archive again from the page cache, an estimate of the digest's cost;`);
  console.log(` fsync after pg_dump>file took ${results.map((result) => median(result.fileFsyncSeconds).toFixed(2)).join(' s and ')} s)`);

  console.log('');
  for (const result of results) {
    const nullSeconds = median(result.nullSeconds);
    const fileSeconds = median(result.fileSeconds);
    const oursSeconds = median(result.children.map((child) => child.seconds));
    const peakRss = Math.max(...result.children.map((child) => child.maxRssBytes));
    const size = formatMegabytes(result.databaseBytes);
    console.log(`${verdict(oursSeconds / nullSeconds <= MAX_TIME_RATIO)}  ${size}: dumpDatabase time <= ${MAX_TIME_RATIO} x pg_dump > /dev/null`);
    console.log(`${verdict(oursSeconds / fileSeconds <= MAX_TIME_RATIO)}  ${size}: dumpDatabase time <= ${MAX_TIME_RATIO} x pg_dump > file (same disk)`);
    console.log(`${verdict(peakRss <= MAX_PEAK_RSS_MB * MEGABYTE)}  ${size}: dumpDatabase peak RSS <= ${MAX_PEAK_RSS_MB} MB`);
  }
}

async function runParent(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      scales: { type: 'string', default: '7,70' },
      runs: { type: 'string', default: '3' },
      directory: { type: 'string', default: os.tmpdir() },
      /** Encrypt the dumpDatabase archive with age, as a backup with recipients does. */
      encrypt: { type: 'boolean', default: false },
    },
  });
  if (values.encrypt) process.env.BENCH_AGE_RECIPIENT = generateIdentity().recipient.toString();
  const scales = parseScales(values.scales as string);
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`--runs must be a positive integer, got ${values.runs}`);
  const directory = path.resolve(values.directory as string);

  const pgBin = path.dirname(tool('pg_dump'));
  const pgDumpVersion = (await timeCommand(path.join(pgBin, 'pg_dump'), ['--version'], process.env)).stdout.trim();
  console.log(`machine: ${os.cpus()[0]?.model ?? 'unknown CPU'}, ${os.cpus().length} CPUs, ${(os.totalmem() / 2 ** 30).toFixed(1)} GiB RAM`);
  console.log(`node ${process.version}, ${pgDumpVersion} (${pgBin})`);
  console.log(`free space: /dev/shm ${formatMegabytes(freeBytes('/dev/shm'))}, /tmp ${formatMegabytes(freeBytes('/tmp'))}, ${directory} ${formatMegabytes(freeBytes(directory))}`);

  // The store folder holds one reference file and one archive at a time, and
  // each is smaller than the database. The check is an estimate, not a bound.
  const largestDatabaseBytes = Math.max(...scales) * ESTIMATED_BYTES_PER_SCALE;
  if (freeBytes(directory) < 2 * largestDatabaseBytes) {
    throw new Error(`${directory} has ${formatMegabytes(freeBytes(directory))} free, below the estimated ${formatMegabytes(2 * largestDatabaseBytes)}; choose another folder with --directory`);
  }

  const storeRoot = mkdtempSync(path.join(directory, 'opa-backup-postgres-dump-bench-'));
  let server: PostgresServer | undefined;
  // The harness kills the server when this process exits, also on SIGINT and
  // SIGTERM. This listener then removes the cluster and archive folders.
  const removeFiles = (): void => {
    rmSync(storeRoot, { recursive: true, force: true });
    if (server) rmSync(path.dirname(server.dataDirectory), { recursive: true, force: true });
  };
  process.once('exit', removeFiles);
  try {
    server = await startPostgres('bench-postgres-dump');
    const clusterFree = freeBytes(path.dirname(server.dataDirectory));
    console.log(`cluster: ${server.dataDirectory} (${formatMegabytes(clusterFree)} free there); archives: ${storeRoot}`);
    const totalDatabaseBytes = scales.reduce((sum, scale) => sum + scale * ESTIMATED_BYTES_PER_SCALE, 0);
    if (clusterFree < 1.5 * totalDatabaseBytes) {
      throw new Error(`the cluster folder has ${formatMegabytes(clusterFree)} free, below the estimated ${formatMegabytes(1.5 * totalDatabaseBytes)} for scales ${scales.join(', ')}`);
    }
    console.log(`${runs} run(s) per measurement, alternating; load average before: ${formatLoad()}`);

    const results: ScaleResult[] = [];
    for (const scale of scales) results.push(await measureScale(server, scale, runs, storeRoot, pgBin));
    console.log(`\nload average after: ${formatLoad()}`);
    printResults(results);
  } finally {
    if (server) await server.stop();
    removeFiles();
    process.removeListener('exit', removeFiles);
  }
}

const argv = process.argv.slice(2);
const main = argv.includes('--child') ? runChild(argv) : runParent(argv);
main.catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
