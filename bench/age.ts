// Benchmark of activities/crypto/age against the age CLI on the same file in
// the same run: X25519 encryption, decryption, and SHA-256 hashing with
// Node streams against sha256sum. Every measurement runs in its own child
// process, and the wall time includes process start-up for both sides. Peak
// RSS comes from process.resourceUsage().maxRSS (Node) or /usr/bin/time -f %M
// (CLI tools).
//
//   npx tsc -p . && node dist/bench/age.js [--megabytes 1024] [--runs 3] [--keep]
//
// It exits 0 whatever the verdict, because it is a measurement, not a test.
import { execFileSync, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync, mkdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { parseArgs } from 'node:util';
import { createDecryptStream, createEncryptStream, generateIdentity, parseIdentity, parseRecipient } from '../activities/crypto/age';
import { loadPlanFile } from '../activities/plan-loader';
import { verifyStoredBackup } from '../activities/verify';
import { MANIFEST_FORMAT, MANIFEST_VERSION, type Manifest } from '../common/manifest';

/** Our encryption and decryption must reach at least this fraction of the CLI's throughput. */
const MIN_THROUGHPUT_RATIO = 0.5;
/** Peak RSS limit of an encrypting or decrypting child process, in MB (10^6 bytes). */
const MAX_PEAK_RSS_MB = 150;
/** Node stream hashing must reach at least this fraction of sha256sum's throughput. */
const MIN_HASH_RATIO = 0.8;
const MEGABYTE = 1_000_000;
const MEBIBYTE = 1024 * 1024;
/** Read size of the Node children; the default of 64 KiB costs more per byte in stream overhead. */
const READ_CHUNK_BYTES = MEBIBYTE;
const BENCH_DIRECTORY = path.join(os.tmpdir(), 'opa-backup-age-bench');

/** One line of JSON that a child process prints on stdout. */
interface ChildResult {
  maxRssBytes: number;
  sha256?: string;
}

interface Measurement {
  seconds: number;
  maxRssBytes: number | undefined;
}

// ---------------------------------------------------------------------------
// Child process: one operation, then its peak RSS
// ---------------------------------------------------------------------------

/** Writable that discards data and hashes it, for checking a decryption without writing it out. */
function hashingSink(hash: ReturnType<typeof createHash>): Writable {
  return new Writable({
    write(chunk: Buffer, _encoding, callback) {
      hash.update(chunk);
      callback();
    },
  });
}

async function runChild(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      child: { type: 'string' },
      input: { type: 'string' },
      output: { type: 'string' },
      recipient: { type: 'string' },
      /** Path of an identity file. */
      identity: { type: 'string' },
    },
  });
  const input = values.input as string;
  const source = createReadStream(input, { highWaterMark: READ_CHUNK_BYTES });
  const result: ChildResult = { maxRssBytes: 0 };
  switch (values.child) {
    case 'encrypt':
      await pipeline(
        source,
        createEncryptStream({ recipients: [parseRecipient(values.recipient as string)] }),
        createWriteStream(values.output as string),
      );
      break;
    case 'decrypt':
      await pipeline(
        source,
        createDecryptStream({ identities: parseIdentity(readFileSync(values.identity as string, 'utf8')) }),
        createWriteStream(values.output as string),
      );
      break;
    case 'decrypt-hash': {
      const hash = createHash('sha256');
      await pipeline(source, createDecryptStream({ identities: parseIdentity(readFileSync(values.identity as string, 'utf8')) }), hashingSink(hash));
      result.sha256 = hash.digest('hex');
      break;
    }
    case 'hash': {
      const hash = createHash('sha256');
      await pipeline(source, hashingSink(hash));
      result.sha256 = hash.digest('hex');
      break;
    }
    case 'verify': {
      // `input` is a plan file whose destination holds one backup, "bench/BACKUP_ID".
      source.destroy();
      const plan = loadPlanFile(input);
      const report = await verifyStoredBackup(plan, values.output as string);
      if (report.outcome !== 'ok') throw new Error(`verify failed: ${JSON.stringify(report.checks)}`);
      break;
    }
    default:
      throw new Error(`unknown child operation "${values.child}"; expected encrypt, decrypt, decrypt-hash, hash or verify`);
  }
  // maxRSS is in kilobytes (KiB on Linux).
  result.maxRssBytes = process.resourceUsage().maxRSS * 1024;
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

// ---------------------------------------------------------------------------
// Parent process
// ---------------------------------------------------------------------------

/** Runs a command and returns its wall time, stdout and stderr; throws when it exits non-zero. */
function timeCommand(command: string, args: string[]): Promise<{ seconds: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (data: Buffer) => (stdout += data.toString()));
    child.stderr.on('data', (data: Buffer) => (stderr += data.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      const seconds = (performance.now() - started) / 1000;
      if (code === 0) resolve({ seconds, stdout, stderr });
      else reject(new Error(`${command} ${args.join(' ')} exited with ${code}: ${stderr.trim()}`));
    });
  });
}

async function measureNode(args: string[]): Promise<Measurement & { result: ChildResult }> {
  const { seconds, stdout } = await timeCommand(process.execPath, [__filename, ...args]);
  const result = JSON.parse(stdout.trim().split('\n').at(-1) as string) as ChildResult;
  return { seconds, maxRssBytes: result.maxRssBytes, result };
}

const timeBinary = '/usr/bin/time';
const hasTimeBinary = existsSync(timeBinary);

/** Runs a CLI tool under /usr/bin/time for its peak RSS, when that binary exists. */
async function measureTool(command: string, args: string[]): Promise<Measurement & { stdout: string }> {
  if (!hasTimeBinary) {
    const { seconds, stdout } = await timeCommand(command, args);
    return { seconds, maxRssBytes: undefined, stdout };
  }
  const { seconds, stdout, stderr } = await timeCommand(timeBinary, ['-f', 'maxrss-kb=%M', command, ...args]);
  const match = /maxrss-kb=(\d+)/.exec(stderr);
  return { seconds, maxRssBytes: match ? Number(match[1]) * 1024 : undefined, stdout };
}

/** Fastest wall time and highest peak RSS over several runs of one operation. */
class BestOf implements Measurement {
  seconds = Infinity;
  maxRssBytes: number | undefined;

  async add(measure: () => Promise<Measurement>): Promise<void> {
    const measurement = await measure();
    this.seconds = Math.min(this.seconds, measurement.seconds);
    if (measurement.maxRssBytes !== undefined) this.maxRssBytes = Math.max(this.maxRssBytes ?? 0, measurement.maxRssBytes);
  }
}

function formatLoad(): string {
  return os
    .loadavg()
    .map((load) => load.toFixed(2))
    .join(' ');
}

async function writeRandomFile(file: string, bytes: number): Promise<void> {
  const output = createWriteStream(file);
  for (let written = 0; written < bytes; written += MEBIBYTE) {
    const block = randomBytes(Math.min(MEBIBYTE, bytes - written));
    if (!output.write(block)) await new Promise<void>((resolve) => output.once('drain', () => resolve()));
  }
  await new Promise<void>((resolve, reject) => output.end((error?: Error | null) => (error ? reject(error) : resolve())));
}

function throughput(bytes: number, seconds: number): number {
  return bytes / MEGABYTE / seconds;
}

function formatRss(bytes: number | undefined): string {
  return bytes === undefined ? 'n/a' : `${(bytes / MEGABYTE).toFixed(1)} MB`;
}

function verdict(pass: boolean): string {
  return pass ? 'PASS' : 'FAIL';
}

function toolVersion(command: string, args: string[]): string {
  try {
    return execFileSync(command, args, { encoding: 'utf8' }).split('\n')[0].trim();
  } catch {
    return 'unknown';
  }
}

async function runParent(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      megabytes: { type: 'string', default: '1024' },
      runs: { type: 'string', default: '3' },
      keep: { type: 'boolean', default: false },
    },
  });
  const mebibytes = Number(values.megabytes);
  const runs = Number(values.runs);
  if (!Number.isInteger(mebibytes) || mebibytes < 1) throw new Error(`--megabytes must be a positive integer (MiB), got ${values.megabytes}`);
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`--runs must be a positive integer, got ${values.runs}`);
  const bytes = mebibytes * MEBIBYTE;

  mkdirSync(BENCH_DIRECTORY, { recursive: true });
  const plainFile = path.join(BENCH_DIRECTORY, `plain-${mebibytes}MiB.bin`);
  const oursFile = path.join(BENCH_DIRECTORY, 'ours.age');
  const cliFile = path.join(BENCH_DIRECTORY, 'cli.age');
  const keyFile = path.join(BENCH_DIRECTORY, 'identity.txt');

  console.log(`machine: ${os.cpus()[0]?.model ?? 'unknown CPU'}, ${os.cpus().length} CPUs, ${(os.totalmem() / 2 ** 30).toFixed(1)} GiB RAM`);
  console.log(`node ${process.version}, age ${toolVersion('age', ['--version'])}, ${toolVersion('sha256sum', ['--version'])}`);
  console.log(`data: ${plainFile} (${mebibytes} MiB = ${(bytes / MEGABYTE).toFixed(0)} MB), best of ${runs} run(s) per measurement`);

  if (existsSync(plainFile) && statSync(plainFile).size === bytes) {
    console.log('reusing the existing random file');
  } else {
    console.log('writing random data...');
    await writeRandomFile(plainFile, bytes);
  }

  const identity = generateIdentity();
  writeFileSync(keyFile, `${identity.encodeSecret()}\n`, { mode: 0o600 });
  const recipient = identity.recipient.toString();

  // The first pass reads the file into the page cache, so every timed pass reads from memory.
  const reference = await measureTool('sha256sum', [plainFile]);
  const expectedHash = reference.stdout.split(' ')[0];

  // Runs alternate between Node and the CLI, so a change in machine load affects both sides alike.
  console.log(`measuring... (load average before: ${formatLoad()})`);
  const oursEncrypt = new BestOf();
  const cliEncrypt = new BestOf();
  const oursDecrypt = new BestOf();
  const cliDecrypt = new BestOf();
  const oursHash = new BestOf();
  const cliHash = new BestOf();
  for (let run = 0; run < runs; run++) {
    await oursEncrypt.add(() =>
      measureNode(['--child', 'encrypt', '--input', plainFile, '--output', oursFile, '--recipient', recipient]),
    );
    await cliEncrypt.add(() => measureTool('age', ['-r', recipient, '-o', cliFile, plainFile]));
    await oursDecrypt.add(() =>
      measureNode(['--child', 'decrypt', '--input', oursFile, '--output', '/dev/null', '--identity', keyFile]),
    );
    await cliDecrypt.add(() => measureTool('age', ['-d', '-i', keyFile, '-o', '/dev/null', cliFile]));
    await oursHash.add(() => measureNode(['--child', 'hash', '--input', plainFile]));
    await cliHash.add(() => measureTool('sha256sum', [plainFile]));
  }
  console.log(`load average after: ${formatLoad()}`);

  // verify without an identity reads each stored object through its SHA-256
  // check, as `opa-backup verify` does; sha256sum reads the same file.
  const verifyRoot = path.join(BENCH_DIRECTORY, 'verify-store');
  const backupId = '20261204T000000Z-0000bench';
  rmSync(verifyRoot, { recursive: true, force: true });
  mkdirSync(path.join(verifyRoot, 'bench', backupId), { recursive: true });
  symlinkSync(oursFile, path.join(verifyRoot, 'bench', backupId, 'data.bin.age'));
  const storedSha256 = (await measureTool('sha256sum', [oursFile])).stdout.split(' ')[0];
  const manifest: Manifest = {
    format: MANIFEST_FORMAT,
    version: MANIFEST_VERSION,
    backupId,
    plan: 'bench',
    status: 'complete',
    startedAt: new Date().toISOString(),
    completedAt: new Date().toISOString(),
    workflow: { workflowId: 'bench', runId: 'bench' },
    encryption: { mode: 'x25519', recipients: [recipient] },
    artifacts: [
      {
        kind: 'postgres-dump',
        source: 'bench',
        key: 'data.bin.age',
        size: statSync(oursFile).size,
        sha256: storedSha256,
        plaintext: { size: bytes, sha256: expectedHash },
        encryption: 'age',
        startedAt: new Date().toISOString(),
        completedAt: new Date().toISOString(),
      },
    ],
    failures: [],
  };
  writeFileSync(path.join(verifyRoot, 'bench', backupId, 'manifest.json'), JSON.stringify(manifest));
  const verifyPlan = path.join(BENCH_DIRECTORY, 'verify-plan.json');
  writeFileSync(
    verifyPlan,
    JSON.stringify({ name: 'bench', destination: { local: { path: verifyRoot } }, encryption: { recipients: [recipient] }, sources: { opa: [{ name: 'x', url: 'http://127.0.0.1:9' }] } }),
  );
  const oursVerify = new BestOf();
  const cliVerify = new BestOf();
  for (let run = 0; run < runs; run++) {
    await oursVerify.add(() => measureNode(['--child', 'verify', '--input', verifyPlan, '--output', backupId]));
    await cliVerify.add(() => measureTool('sha256sum', [oursFile]));
  }

  // Untimed checks that both sides produce files the other side decrypts to the original.
  const nodeHash = (await measureNode(['--child', 'hash', '--input', plainFile])).result.sha256;
  const oursOfCli = (await measureNode(['--child', 'decrypt-hash', '--input', cliFile, '--identity', keyFile])).result.sha256;
  const cliOfOurs = execFileSync('sh', ['-c', 'age -d -i "$1" "$2" | sha256sum', 'sh', keyFile, oursFile], {
    encoding: 'utf8',
  }).split(' ')[0];

  const rows: Array<[string, Measurement, Measurement]> = [
    ['encrypt', oursEncrypt, cliEncrypt],
    ['decrypt', oursDecrypt, cliDecrypt],
    ['sha256', oursHash, cliHash],
    ['verify', oursVerify, cliVerify],
  ];
  console.log('');
  console.log('operation   node MB/s   cli MB/s   ratio   node peak RSS   cli peak RSS');
  for (const [name, ours, cli] of rows) {
    const oursRate = throughput(bytes, ours.seconds);
    const cliRate = throughput(bytes, cli.seconds);
    console.log(
      `${name.padEnd(10)} ${oursRate.toFixed(0).padStart(9)} ${cliRate.toFixed(0).padStart(10)} ` +
        `${(oursRate / cliRate).toFixed(2).padStart(7)} ${formatRss(ours.maxRssBytes).padStart(15)} ${formatRss(cli.maxRssBytes).padStart(14)}`,
    );
  }
  console.log('(cli is age for encrypt and decrypt, sha256sum for sha256 and verify; MB = 10^6 bytes; wall time includes process start-up)');
  console.log('(verify is opa-backup verify without an identity on one stored age file, against sha256sum of that file)');
  console.log('(encrypt writes the ciphertext to a file next to the data; decrypt writes to /dev/null)');
  console.log('');

  const checks: Array<[string, boolean]> = [
    [`encrypt throughput >= ${MIN_THROUGHPUT_RATIO} x age`, oursEncrypt.seconds <= cliEncrypt.seconds / MIN_THROUGHPUT_RATIO],
    [`decrypt throughput >= ${MIN_THROUGHPUT_RATIO} x age`, oursDecrypt.seconds <= cliDecrypt.seconds / MIN_THROUGHPUT_RATIO],
    [`encrypt peak RSS < ${MAX_PEAK_RSS_MB} MB`, (oursEncrypt.maxRssBytes ?? Infinity) < MAX_PEAK_RSS_MB * MEGABYTE],
    [`decrypt peak RSS < ${MAX_PEAK_RSS_MB} MB`, (oursDecrypt.maxRssBytes ?? Infinity) < MAX_PEAK_RSS_MB * MEGABYTE],
    [`sha256 throughput >= ${MIN_HASH_RATIO} x sha256sum`, oursHash.seconds <= cliHash.seconds / MIN_HASH_RATIO],
    [`verify throughput >= ${MIN_HASH_RATIO} x sha256sum`, oursVerify.seconds <= cliVerify.seconds / MIN_HASH_RATIO],
    ['node sha256 equals sha256sum', nodeHash === expectedHash],
    ['age CLI decrypts our file to the original', cliOfOurs === expectedHash],
    ['we decrypt the age CLI file to the original', oursOfCli === expectedHash],
  ];
  for (const [name, pass] of checks) console.log(`${verdict(pass)}  ${name}`);

  if (!values.keep) {
    rmSync(oursFile, { force: true });
    rmSync(cliFile, { force: true });
  }
  rmSync(keyFile, { force: true });
}

const argv = process.argv.slice(2);
const main = argv.includes('--child') ? runChild(argv) : runParent(argv);
main.catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
