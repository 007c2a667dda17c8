// Starts a PostgreSQL server for tests: a copy of a template cluster in a
// fresh directory, then `postgres` on a free loopback port with fsync off.
//
// initdb runs once per server version into opa-backup-postgres-template-VERSION
// (about 28 MB, kept for later runs), and every server starts from a copy of
// it. Both live in /dev/shm when it has 1 GiB free, else in /tmp. On the
// 2-vCPU ext4 machine the harness was written on, initdb took 4 to 6 s in /tmp
// and 1.6 s in /dev/shm, and copying the template took 2 to 3 s in /tmp and
// 0.2 s in /dev/shm.
//
// PostgreSQL rejects running as root, and the tests run as root, so initdb and
// the server run as the `postgres` OS user, which owns the directory. Loopback
// TCP connections authenticate with SCRAM-SHA-256 and a password generated
// per server. Connections over the Unix socket in that directory are trusted.
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, existsSync, mkdtempSync, renameSync, rmSync, statfsSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { Client } from 'pg';
import { freePort } from './ports';
import { startProcess, type ManagedProcess } from './process';
import { tool } from './tools';

const host = '127.0.0.1';
const superuser = 'postgres';
const readyTimeoutMs = 30_000;
const minimumTmpfsBytes = 1024 * 1024 * 1024;

/** Returns /dev/shm when it is a tmpfs with room for a few clusters, else /tmp. */
function clusterRoot(): string {
  try {
    const info = statfsSync('/dev/shm');
    if (info.bavail * info.bsize >= minimumTmpfsBytes) return '/dev/shm';
  } catch {
    // No /dev/shm on this system.
  }
  return '/tmp';
}

export interface PostgresServer {
  /** postgres://postgres@127.0.0.1:PORT/postgres, without the password. */
  url: string;
  /** Password of the `postgres` role for TCP connections. */
  password: string;
  port: number;
  /** The cluster's data directory; stop() removes it and its parent. */
  dataDirectory: string;
  /** PGHOST, PGPORT, PGUSER and PGPASSWORD for client tools run by the test. */
  clientEnvironment: NodeJS.ProcessEnv;
  /** Stops the server (fast shutdown) and removes its directory. */
  stop(): Promise<void>;
  /** Stops the server and starts it again on the same port and data. */
  restart(): Promise<void>;
  /** Runs `sql` with `psql -v ON_ERROR_STOP=1` as `postgres` in database `db` and returns its output (unaligned, tuples only). */
  psql(db: string, sql: string): Promise<string>;
  /** Opens a `pg` connection to database `db` as `role` (default `postgres`). */
  connect(db: string, role?: { user: string; password: string }): Promise<Client>;
}

/** uid and gid of the `postgres` OS user. */
function postgresUser(): { uid: number; gid: number } {
  const uid = Number(execFileSync('id', ['-u', superuser], { encoding: 'utf8' }).trim());
  const gid = Number(execFileSync('id', ['-g', superuser], { encoding: 'utf8' }).trim());
  return { uid, gid };
}

/** Runs a command to completion and returns its stdout; rejects with its output when it fails. */
export function run(
  command: string,
  args: string[],
  options: { env?: NodeJS.ProcessEnv; input?: string; uid?: number; gid?: number; cwd?: string } = {},
): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, {
      env: options.env ?? process.env,
      uid: options.uid,
      gid: options.gid,
      cwd: options.cwd,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    child.stdout.on('data', (chunk: Buffer) => stdout.push(chunk));
    child.stderr.on('data', (chunk: Buffer) => stderr.push(chunk));
    child.once('error', reject);
    child.once('close', (code, signal) => {
      const output = Buffer.concat(stdout).toString('utf8');
      if (code === 0) resolve(output);
      else {
        const status = signal ? `was killed by ${signal}` : `exited with ${code}`;
        reject(new Error(`${path.basename(command)} ${status}: ${Buffer.concat(stderr).toString('utf8').trim()}`));
      }
    });
    child.stdin.end(options.input ?? '');
  });
}

/** Runs initdb once per PostgreSQL version and returns the template cluster's data directory. */
async function templateCluster(root: string, uid: number, gid: number, environment: NodeJS.ProcessEnv): Promise<string> {
  const version = (await run(tool('postgres'), ['--version'])).trim();
  const template = `${root}/opa-backup-postgres-template-${version.replace(/[^0-9A-Za-z.]+/g, '-')}`;
  if (existsSync(path.join(template, 'PG_VERSION'))) {
    // The folder's name is predictable in a world-writable folder, so only a
    // template that initdb could have written (owned by postgres, mode 0700) is used.
    const info = statSync(template);
    if (info.uid !== uid || (info.mode & 0o077) !== 0) {
      throw new Error(`template cluster ${template} is not owned by the postgres user with mode 0700; remove it and run the tests again`);
    }
    return template;
  }

  const building = mkdtempSync(`${template}.building-`);
  chownSync(building, uid, gid);
  try {
    await run(
      tool('initdb'),
      [
        '--pgdata', path.join(building, 'data'),
        '--username', superuser,
        '--auth', 'trust',
        '--encoding', 'UTF8',
        '--locale', 'C',
        // 1 MiB WAL segments instead of 16 MiB keep the template and its copies small.
        '--wal-segsize', '1',
        '--no-sync',
        '--no-instructions',
      ],
      { uid, gid, cwd: building, env: environment },
    );
    try {
      renameSync(path.join(building, 'data'), template);
    } catch (error) {
      // Another test process finished its template first; use that one.
      if (!existsSync(path.join(template, 'PG_VERSION'))) throw error;
    }
  } finally {
    rmSync(building, { recursive: true, force: true });
  }
  return template;
}

/** Starts a cluster copied from the template; `name` names the log file in .test-runs. */
export async function startPostgres(name: string): Promise<PostgresServer> {
  const { uid, gid } = postgresUser();
  // The server's environment: no PG* variables of the test process, and a
  // working directory the postgres user can enter.
  const serverEnvironment: NodeJS.ProcessEnv = { PATH: process.env.PATH, LANG: 'C.UTF-8', LC_ALL: 'C.UTF-8' };
  const root = clusterRoot();
  const template = await templateCluster(root, uid, gid, serverEnvironment);

  const baseDirectory = mkdtempSync(`${root}/opa-backup-postgres-`);
  chownSync(baseDirectory, uid, gid);
  chmodSync(baseDirectory, 0o700);
  const dataDirectory = path.join(baseDirectory, 'data');
  const password = randomBytes(18).toString('base64url');
  const port = await freePort();
  const asPostgres = { uid, gid, cwd: baseDirectory, env: serverEnvironment };

  try {
    // cp -a keeps the postgres user as owner and the data directory's mode 0700.
    await run('cp', ['-a', template, dataDirectory]);
    const hbaFile = path.join(dataDirectory, 'pg_hba.conf');
    writeFileSync(hbaFile, `local all all trust\nhost all all ${host}/32 scram-sha-256\n`, { mode: 0o600 });
    chownSync(hbaFile, uid, gid);
  } catch (error) {
    rmSync(baseDirectory, { recursive: true, force: true });
    throw error;
  }

  const serverArguments = [
    '-D', dataDirectory,
    '-p', String(port),
    '-c', `listen_addresses=${host}`,
    '-c', `unix_socket_directories=${baseDirectory}`,
    // Test data is thrown away, so durability only costs time.
    '-c', 'fsync=off',
    '-c', 'synchronous_commit=off',
    '-c', 'full_page_writes=off',
    '-c', 'max_wal_senders=0',
    '-c', 'wal_level=minimal',
  ];
  const url = `postgres://${superuser}@${host}:${port}/postgres`;
  const clientEnvironment: NodeJS.ProcessEnv = {
    ...Object.fromEntries(Object.entries(process.env).filter(([variable]) => !variable.startsWith('PG'))),
    PGHOST: host,
    PGPORT: String(port),
    PGUSER: superuser,
    PGPASSWORD: password,
  };

  const connect = async (db: string, role = { user: superuser, password }): Promise<Client> => {
    const client = new Client({ host, port, user: role.user, password: role.password, database: db });
    await client.connect();
    return client;
  };
  const connectOverSocket = async (): Promise<Client> => {
    const client = new Client({ host: baseDirectory, port, user: superuser, database: 'postgres' });
    await client.connect();
    return client;
  };

  let starts = 0;
  let server: ManagedProcess;
  const start = async (): Promise<void> => {
    starts += 1;
    server = startProcess(starts === 1 ? name : `${name}-${starts}`, tool('postgres'), serverArguments, asPostgres);
    const deadline = Date.now() + readyTimeoutMs;
    for (;;) {
      if (server.child.exitCode !== null || server.child.signalCode !== null) {
        throw new Error(`postgres exited before it accepted connections:\n${server.log()}`);
      }
      try {
        const client = await connectOverSocket();
        try {
          // The template's postgres role has no password. The password set
          // here is stored in the cluster, so only the first start sets it.
          if (starts === 1) await client.query(`ALTER ROLE ${superuser} PASSWORD ${client.escapeLiteral(password)}`);
        } finally {
          await client.end();
        }
        await (await connect('postgres')).end();
        return;
      } catch (error) {
        if (Date.now() > deadline) {
          await server.stop('SIGINT');
          throw new Error(`postgres on ${host}:${port} not ready after ${readyTimeoutMs} ms: ${(error as Error).message}\n${server.log()}`);
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  };

  try {
    await start();
  } catch (error) {
    rmSync(baseDirectory, { recursive: true, force: true });
    throw error;
  }

  return {
    url,
    password,
    port,
    dataDirectory,
    clientEnvironment,
    connect,
    async stop() {
      // SIGINT is PostgreSQL's fast shutdown: it ends sessions and rolls back open transactions.
      await server.stop('SIGINT');
      rmSync(baseDirectory, { recursive: true, force: true });
    },
    async restart() {
      await server.stop('SIGINT');
      await start();
    },
    psql(db, sql) {
      return run(tool('psql'), ['-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-d', db, '-f', '-'], {
        env: clientEnvironment,
        input: sql,
      });
    },
  };
}
