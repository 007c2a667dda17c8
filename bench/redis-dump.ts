// Benchmark of dumpRdb and dumpKeys (activities/redis/dump.ts) on one Redis
// server filled with small keys, against `redis-cli --rdb` in the same run.
//
// The server comes from test/harness/redis.ts, so it listens on 127.0.0.1
// with persistence off. The fill sends a generated RESP file through
// `redis-cli --pipe`. Most keys are strings, and the rest are hashes, lists
// and sets with small values. One key in ten has a TTL of one day, so none
// expires during the run. The measurements then alternate, three runs each
// by default, and the tables show their medians:
//
// - `redis-cli -p PORT --rdb FILE`, the reference, which writes a file in the
//   store folder (default /tmp). Its time is the wall time of the process.
// - dumpRdb into a LocalBlobStore in the same folder, in a child Node
//   process, so that process.resourceUsage().maxRSS is that of the dump
//   alone. Its time is measured inside the child around the call, so it
//   leaves out Node's start-up but includes the SHA-256 digest and the fsync
//   that LocalBlobStore does.
// - dumpKeys into a LocalBlobStore, in a child as well, once for each
//   BATCH:SCAN pair of --keys-settings (batchSize and scanCount of dumpKeys).
//   The Redis server's CPU time during each run comes from INFO cpu, so the
//   output shows whether Redis or the dump limits the rate.
//
//   npx tsc -p . && node dist/bench/redis-dump.js [--keys 1000000] [--runs 3] [--directory /tmp] [--keys-settings 1000:1000,100:1000]
//
// It exits 0 whatever the verdict, because it is a measurement, not a test.
import { spawn } from 'node:child_process';
import { closeSync, createWriteStream, mkdtempSync, openSync, readSync, rmSync, statfsSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { once } from 'node:events';
import { parseArgs } from 'node:util';
import { dumpKeys, dumpRdb } from '../activities/redis/dump';
import { LocalBlobStore } from '../activities/storage/local';
import { startRedis, type RedisServer } from '../test/harness/redis';
import { tool } from '../test/harness/tools';

/** dumpRdb may take at most this multiple of the time of `redis-cli --rdb FILE`. */
const MAX_RDB_TIME_RATIO = 1.2;
/** dumpKeys must store at least this many keys per second. */
const MIN_KEYS_PER_SECOND = 150_000;
const MEGABYTE = 1_000_000;
/** TTL of the keys that have one, in seconds: long enough that none expires during the run. */
const KEY_TTL_SECONDS = 86_400;
/**
 * Estimated disk bytes per key while the benchmark runs: the RESP fill file
 * (about 70 bytes per key), the reference RDB and one dump (about 40 bytes
 * per key each). Used only to check free space before starting.
 */
const ESTIMATED_BYTES_PER_KEY = 300;

/** One line of JSON that a child process prints on stdout. */
interface ChildResult {
  /** Wall time of the dumpRdb or dumpKeys call. */
  seconds: number;
  /** CPU time of the child process during the call. */
  cpuUserSeconds: number;
  cpuSystemSeconds: number;
  /** process.resourceUsage().maxRSS in bytes, read right after the call. */
  maxRssBytes: number;
  size: number;
  /** Keys in the dump: records written by dumpKeys, or INFO keyspace for dumpRdb. */
  keys: number;
  expiredSkipped: number;
}

/** batchSize and scanCount of one dumpKeys measurement. */
interface KeysSetting {
  batchSize: number;
  scanCount: number;
}

// ---------------------------------------------------------------------------
// Child process: one dumpRdb or dumpKeys call, then its peak RSS
// ---------------------------------------------------------------------------

async function runChild(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      child: { type: 'string' },
      url: { type: 'string' },
      store: { type: 'string' },
      key: { type: 'string' },
      'batch-size': { type: 'string' },
      'scan-count': { type: 'string' },
    },
  });
  const store = new LocalBlobStore(values.store as string);
  const common = { url: values.url as string, source: 'bench', store, key: values.key as string };

  const cpuBefore = process.cpuUsage();
  const started = performance.now();
  let size: number;
  let keys: number;
  let expiredSkipped = 0;
  if (values.child === 'rdb') {
    const result = await dumpRdb(common);
    size = result.size;
    keys = Object.values(result.keyspace).reduce((sum, count) => sum + count, 0);
  } else if (values.child === 'keys') {
    const result = await dumpKeys({
      ...common,
      batchSize: Number(values['batch-size']),
      scanCount: Number(values['scan-count']),
    });
    size = result.size;
    keys = Object.values(result.records).reduce((sum, count) => sum + count, 0);
    expiredSkipped = result.expiredSkipped;
  } else {
    throw new Error(`invalid child operation "${values.child}"; expected rdb or keys`);
  }
  const finished = performance.now();
  const cpu = process.cpuUsage(cpuBefore);

  const output: ChildResult = {
    seconds: (finished - started) / 1000,
    cpuUserSeconds: cpu.user / 1e6,
    cpuSystemSeconds: cpu.system / 1e6,
    // maxRSS is in KiB on Linux.
    maxRssBytes: process.resourceUsage().maxRSS * 1024,
    size,
    keys,
    expiredSkipped,
  };
  process.stdout.write(`${JSON.stringify(output)}\n`);
}

// ---------------------------------------------------------------------------
// Parent process
// ---------------------------------------------------------------------------

/** Encodes one command as a RESP array of bulk strings, the input format of `redis-cli --pipe`. */
function encodeCommand(args: string[]): string {
  let text = `*${args.length}\r\n`;
  for (const arg of args) text += `$${Buffer.byteLength(arg)}\r\n${arg}\r\n`;
  return text;
}

/**
 * Writes the commands that create `count` keys to `file`: 85% strings and 5%
 * each of hashes, lists and sets, all with values of about 20 bytes. Every
 * tenth key gets a TTL of KEY_TTL_SECONDS.
 */
async function writeFillCommands(file: string, count: number): Promise<void> {
  const stream = createWriteStream(file);
  let text = '';
  for (let index = 0; index < count; index++) {
    const key = `key:${index}`;
    const value = `value-${index}-abcdefghij`;
    const kind = index % 20;
    if (kind === 0) text += encodeCommand(['HSET', key, 'name', value, 'count', String(index), 'flag', 'on']);
    else if (kind === 1) text += encodeCommand(['RPUSH', key, value, 'second', 'third', 'fourth']);
    else if (kind === 2) text += encodeCommand(['SADD', key, value, 'alpha', 'beta', 'gamma']);
    else text += encodeCommand(['SET', key, value]);
    if (index % 10 === 3) text += encodeCommand(['EXPIRE', key, String(KEY_TTL_SECONDS)]);
    if (text.length >= 1 << 20) {
      if (!stream.write(text)) await once(stream, 'drain');
      text = '';
    }
  }
  stream.end(text);
  await once(stream, 'finish');
}

/** Runs a command with stdin read from `stdinFile` when given, and returns its wall time and stdout; throws when it fails. */
function timeCommand(command: string, args: string[], stdinFile?: string): Promise<{ seconds: number; stdout: string }> {
  const descriptor = stdinFile === undefined ? undefined : openSync(stdinFile, 'r');
  return new Promise<{ seconds: number; stdout: string }>((resolve, reject) => {
    const started = performance.now();
    const child = spawn(command, args, { stdio: [descriptor ?? 'ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (data: Buffer) => (stdout += data.toString()));
    child.stderr!.on('data', (data: Buffer) => (stderr += data.toString()));
    child.once('error', reject);
    child.once('close', (code, signal) => {
      const seconds = (performance.now() - started) / 1000;
      if (code === 0) resolve({ seconds, stdout });
      else reject(new Error(`${path.basename(command)} ${signal ? `was killed by ${signal}` : `exited with status ${code}`}: ${stderr.trim()}`));
    });
  }).finally(() => {
    if (descriptor !== undefined) closeSync(descriptor);
  });
}

/** Runs a child of this script and returns the JSON line it prints last. */
async function runChildScript(mode: string, args: string[]): Promise<ChildResult> {
  const { stdout } = await timeCommand(process.execPath, [__filename, '--child', mode, ...args]);
  return JSON.parse(stdout.trim().split('\n').at(-1) as string) as ChildResult;
}

/** Fails unless `file` starts with the RDB magic "REDIS". */
function checkRdbFile(file: string, description: string): void {
  const head = Buffer.alloc(5);
  const descriptor = openSync(file, 'r');
  try {
    readSync(descriptor, head, 0, head.length, 0);
  } finally {
    closeSync(descriptor);
  }
  if (head.toString('latin1') !== 'REDIS') throw new Error(`${description} ${file} is not an RDB file: it starts with ${JSON.stringify(head.toString('latin1'))}`);
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

function describeSetting(setting: KeysSetting): string {
  return `batchSize ${setting.batchSize}, scanCount ${setting.scanCount}`;
}

function parseKeysSettings(text: string): KeysSetting[] {
  return text.split(',').map((part) => {
    const match = /^\s*(\d+):(\d+)\s*$/.exec(part);
    const setting = match ? { batchSize: Number(match[1]), scanCount: Number(match[2]) } : undefined;
    if (!setting || setting.batchSize < 1 || setting.scanCount < 1) {
      throw new Error(`--keys-settings must be a comma-separated list of BATCH:SCAN pairs of positive integers (batchSize:scanCount), got "${text}"`);
    }
    return setting;
  });
}

interface Results {
  referenceSeconds: number[];
  referenceBytes: number;
  rdb: ChildResult[];
  /** One list of runs for each entry of --keys-settings, in the same order. */
  keys: ChildResult[][];
  /** CPU seconds the Redis server used during each dumpKeys run, in the same shape as `keys`. */
  keysServerCpuSeconds: number[][];
}

/** Returns the CPU seconds the Redis server used so far (INFO cpu, user and system, main process only). */
async function serverCpuSeconds(client: ReturnType<RedisServer['client']>): Promise<number> {
  const info = await client.info('cpu');
  const field = (name: string): number => Number(new RegExp(`^${name}:([\\d.]+)`, 'm').exec(info)?.[1] ?? Number.NaN);
  return field('used_cpu_user') + field('used_cpu_sys');
}

/** Runs the reference, dumpRdb and every dumpKeys setting in turn, `runs` times. */
async function measure(server: RedisServer, expectedKeys: number, runs: number, storeRoot: string, settings: KeysSetting[]): Promise<Results> {
  const redisCli = tool('redis-cli');
  const referenceFile = path.join(storeRoot, 'reference.rdb');
  const store = path.join(storeRoot, 'store');
  const results: Results = { referenceSeconds: [], referenceBytes: 0, rdb: [], keys: settings.map(() => []), keysServerCpuSeconds: settings.map(() => []) };
  const client = server.client();

  // One untimed pass, so that the first timed run does not pay for cold caches alone.
  await timeCommand(redisCli, ['-p', String(server.port), '--rdb', referenceFile]);
  rmSync(referenceFile, { force: true });

  for (let run = 1; run <= runs; run++) {
    const reference = await timeCommand(redisCli, ['-p', String(server.port), '--rdb', referenceFile]);
    checkRdbFile(referenceFile, 'the output of redis-cli --rdb');
    results.referenceSeconds.push(reference.seconds);
    results.referenceBytes = statSync(referenceFile).size;
    rmSync(referenceFile, { force: true });

    const rdbKey = 'bench/redis.rdb';
    const rdb = await runChildScript('rdb', ['--url', server.url, '--store', store, '--key', rdbKey]);
    checkRdbFile(path.join(store, ...rdbKey.split('/')), 'the object that dumpRdb stored');
    results.rdb.push(rdb);
    rmSync(store, { recursive: true, force: true });

    const keysParts: string[] = [];
    for (const [index, setting] of settings.entries()) {
      const serverCpuBefore = await serverCpuSeconds(client);
      const keys = await runChildScript('keys', [
        '--url', server.url,
        '--store', store,
        '--key', 'bench/redis.keys',
        '--batch-size', String(setting.batchSize),
        '--scan-count', String(setting.scanCount),
      ]);
      const serverCpu = (await serverCpuSeconds(client)) - serverCpuBefore;
      results.keysServerCpuSeconds[index].push(serverCpu);
      rmSync(store, { recursive: true, force: true });
      if (keys.keys !== expectedKeys) throw new Error(`dumpKeys (${describeSetting(setting)}) wrote ${keys.keys} records, expected ${expectedKeys}`);
      results.keys[index].push(keys);
      keysParts.push(
        `dumpKeys ${setting.batchSize}:${setting.scanCount} ${keys.seconds.toFixed(2)} s ` +
          `(child CPU ${(keys.cpuUserSeconds + keys.cpuSystemSeconds).toFixed(2)} s, Redis CPU ${serverCpu.toFixed(2)} s, peak RSS ${formatMegabytes(keys.maxRssBytes)})`,
      );
    }

    console.log(
      `run ${run}: redis-cli --rdb ${reference.seconds.toFixed(2)} s, dumpRdb ${rdb.seconds.toFixed(2)} s ` +
        `(child CPU ${(rdb.cpuUserSeconds + rdb.cpuSystemSeconds).toFixed(2)} s, peak RSS ${formatMegabytes(rdb.maxRssBytes)}), ${keysParts.join(', ')}`,
    );
  }
  return results;
}

function printResults(results: Results, expectedKeys: number, settings: KeysSetting[]): void {
  const referenceSeconds = median(results.referenceSeconds);
  const rdbSeconds = median(results.rdb.map((child) => child.seconds));
  const rdbRatio = rdbSeconds / referenceSeconds;
  const rdbPeakRss = Math.max(...results.rdb.map((child) => child.maxRssBytes));

  console.log('');
  console.log('measurement                          seconds   keys/s     ratio   child CPU s   peak RSS MB   output MB');
  console.log(
    `${'redis-cli --rdb FILE'.padEnd(34)} ${referenceSeconds.toFixed(2).padStart(9)} ${(expectedKeys / referenceSeconds).toFixed(0).padStart(8)} ` +
      `${'1.000'.padStart(9)} ${'-'.padStart(13)} ${'-'.padStart(13)} ${(results.referenceBytes / MEGABYTE).toFixed(1).padStart(11)}`,
  );
  console.log(
    `${'dumpRdb'.padEnd(34)} ${rdbSeconds.toFixed(2).padStart(9)} ${(expectedKeys / rdbSeconds).toFixed(0).padStart(8)} ` +
      `${rdbRatio.toFixed(3).padStart(9)} ${median(results.rdb.map((child) => child.cpuUserSeconds + child.cpuSystemSeconds)).toFixed(2).padStart(13)} ` +
      `${(rdbPeakRss / MEGABYTE).toFixed(1).padStart(13)} ${(results.rdb[0].size / MEGABYTE).toFixed(1).padStart(11)}`,
  );
  for (const [index, setting] of settings.entries()) {
    const runs = results.keys[index];
    const seconds = median(runs.map((child) => child.seconds));
    const name = `dumpKeys ${setting.batchSize}:${setting.scanCount}`;
    console.log(
      `${name.padEnd(34)} ${seconds.toFixed(2).padStart(9)} ${(expectedKeys / seconds).toFixed(0).padStart(8)} ` +
        `${(seconds / referenceSeconds).toFixed(3).padStart(9)} ${median(runs.map((child) => child.cpuUserSeconds + child.cpuSystemSeconds)).toFixed(2).padStart(13)} ` +
        `${(Math.max(...runs.map((child) => child.maxRssBytes)) / MEGABYTE).toFixed(1).padStart(13)} ${(runs[0].size / MEGABYTE).toFixed(1).padStart(11)}`,
    );
  }
  console.log('(medians; ratio is against redis-cli --rdb; peak RSS is the maximum over the runs; MB = 10^6 bytes;');
  console.log(' dumpKeys BATCH:SCAN is dumpKeys with batchSize BATCH and scanCount SCAN;');
  console.log(' child times are measured around the call, without Node start-up, and include the SHA-256 digest and the fsync of LocalBlobStore)');
  for (const [index, setting] of settings.entries()) {
    console.log(`Redis server CPU during dumpKeys ${setting.batchSize}:${setting.scanCount} (median): ${median(results.keysServerCpuSeconds[index]).toFixed(2)} s`);
  }

  console.log('');
  console.log(`${verdict(rdbRatio <= MAX_RDB_TIME_RATIO)}  dumpRdb time <= ${MAX_RDB_TIME_RATIO} x redis-cli --rdb FILE (same disk): ${rdbRatio.toFixed(3)}`);
  for (const [index, setting] of settings.entries()) {
    const keysPerSecond = expectedKeys / median(results.keys[index].map((child) => child.seconds));
    console.log(`${verdict(keysPerSecond >= MIN_KEYS_PER_SECOND)}  dumpKeys (${describeSetting(setting)}) >= ${MIN_KEYS_PER_SECOND} keys/s: ${keysPerSecond.toFixed(0)} keys/s`);
  }
}

async function runParent(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      keys: { type: 'string', default: '1000000' },
      runs: { type: 'string', default: '3' },
      directory: { type: 'string', default: os.tmpdir() },
      // 1000:1000 are the defaults of dumpKeys, stated here so that the output names them.
      'keys-settings': { type: 'string', default: '1000:1000' },
    },
  });
  const keyCount = Number(values.keys);
  if (!Number.isInteger(keyCount) || keyCount < 1) throw new Error(`--keys must be a positive integer, got ${values.keys}`);
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`--runs must be a positive integer, got ${values.runs}`);
  const settings = parseKeysSettings(values['keys-settings'] as string);
  const directory = path.resolve(values.directory as string);

  const redisVersion = (await timeCommand(tool('redis-server'), ['--version'])).stdout.trim();
  console.log(`machine: ${os.cpus()[0]?.model ?? 'unknown CPU'}, ${os.cpus().length} CPUs, ${(os.totalmem() / 2 ** 30).toFixed(1)} GiB RAM`);
  console.log(`node ${process.version}, ${redisVersion}`);
  console.log(`dumpKeys settings (batchSize:scanCount): ${settings.map((setting) => `${setting.batchSize}:${setting.scanCount}`).join(', ')}`);
  if (freeBytes(directory) < keyCount * ESTIMATED_BYTES_PER_KEY) {
    throw new Error(`${directory} has ${formatMegabytes(freeBytes(directory))} free, below the estimated ${formatMegabytes(keyCount * ESTIMATED_BYTES_PER_KEY)}; choose another folder with --directory`);
  }

  const storeRoot = mkdtempSync(path.join(directory, 'opa-backup-redis-dump-bench-'));
  let server: RedisServer | undefined;
  // The harness kills the server when this process exits, also on SIGINT and
  // SIGTERM. This listener then removes the server and store folders.
  const removeFiles = (): void => {
    rmSync(storeRoot, { recursive: true, force: true });
    if (server) rmSync(server.directory, { recursive: true, force: true });
  };
  process.once('exit', removeFiles);
  try {
    // Redis 7.0 replicates disklessly by default (repl-diskless-sync yes) and
    // waits repl-diskless-sync-delay seconds (default 5, per CONFIG GET on
    // 7.0.15) for more replicas before it starts the transfer. Both
    // redis-cli --rdb and dumpRdb would pay that wait on every run, so it is 0.
    server = await startRedis('bench-redis-dump', { args: ['--repl-diskless-sync-delay', '0'] });
    console.log(`server: ${server.url}, directory ${server.directory}; store folder: ${storeRoot} (${formatMegabytes(freeBytes(storeRoot))} free)`);

    const fillFile = path.join(storeRoot, 'fill.resp');
    const generateStarted = performance.now();
    await writeFillCommands(fillFile, keyCount);
    const generateSeconds = (performance.now() - generateStarted) / 1000;
    const fill = await timeCommand(tool('redis-cli'), ['-p', String(server.port), '--pipe'], fillFile);
    console.log(
      `fill: ${keyCount} keys, command file ${formatMegabytes(statSync(fillFile).size)} generated in ${generateSeconds.toFixed(1)} s, ` +
        `redis-cli --pipe took ${fill.seconds.toFixed(1)} s: ${fill.stdout.trim().split('\n').at(-1)}`,
    );
    rmSync(fillFile, { force: true });

    const client = server.client();
    const loaded = await client.dbsize();
    const memory = /^used_memory_human:(.+)$/m.exec(await client.info('memory'))?.[1].trim() ?? 'unknown';
    client.disconnect();
    if (loaded !== keyCount) throw new Error(`the server contains ${loaded} keys after the fill, expected ${keyCount}`);
    console.log(`server contains ${loaded} keys, used_memory ${memory}`);
    console.log(`${runs} run(s) per measurement, alternating; load average before: ${formatLoad()}`);

    const results = await measure(server, keyCount, runs, storeRoot, settings);
    console.log(`\nload average after: ${formatLoad()}`);
    printResults(results, keyCount, settings);
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
