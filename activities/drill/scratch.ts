// Scratch directories of restore drills and the processes started in them.
//
// Each drill run gets one directory under the drill root (env
// OPA_BACKUP_DRILL_DIR, default <os.tmpdir()>/opa-backup-drills). A small
// registry file in it, drill.json, lists the worker process that owns it,
// every server process started for the drill (each leads its own process
// group) and any directory outside it that holds drill data, such as a
// PostgreSQL cluster in /dev/shm. Activities stop their processes when they
// end or are cancelled. When a worker dies instead, the next worker on the
// host calls reapDrillLeftovers() at start: it kills the process groups and
// removes the directories of every drill whose owner is no longer running.
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { closeSync, openSync, readFileSync } from 'node:fs';
import { chmod, lstat, mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import path from 'node:path';
import { logger } from '../logging';

const REGISTRY_FILE = 'drill.json';
/** A directory without a registry is removed once it is this old: a worker died between creating it and writing the file. */
const ORPHAN_AGE_MS = 60 * 60 * 1000;

interface RegisteredProcess {
  pid: number;
  /** Base name of the executable, for logs. */
  command: string;
  /** Start time from /proc/PID/stat, so a reused pid is never killed. */
  startTime?: string;
}

interface Registry {
  format: 'opa-backup.drill-scratch';
  version: 1;
  drillId: string;
  hostname: string;
  owner: { pid: number; startTime?: string };
  createdAt: string;
  processes: RegisteredProcess[];
  /** Directories outside the scratch directory that the drill created. */
  paths: string[];
}

/** Returns the folder that contains the drills' scratch directories. */
export function drillRoot(): string {
  return process.env.OPA_BACKUP_DRILL_DIR || path.join(tmpdir(), 'opa-backup-drills');
}

/** Reads a process's start time (field 22 of /proc/PID/stat), or undefined when it does not exist. */
export function processStartTime(pid: number): string | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name in field 2 may contain spaces and parentheses, so fields are counted from the last ")".
    return text.slice(text.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

function isAlive(pid: number, startTime: string | undefined): boolean {
  const current = processStartTime(pid);
  return current !== undefined && (startTime === undefined || current === startTime);
}

/**
 * Kills a registered process group with SIGKILL. The group is killed when
 * its leader is the registered process, or when the leader is gone: Linux
 * never hands out a pid equal to the id of a process group that still has
 * members, so surviving members of the group belong to the drill.
 */
function killGroup(entry: RegisteredProcess): void {
  const current = processStartTime(entry.pid);
  if (current !== undefined && entry.startTime !== undefined && current !== entry.startTime) return;
  try {
    process.kill(-entry.pid, 'SIGKILL');
  } catch {
    // The group is empty.
  }
}

const ownerStartTime = processStartTime(process.pid);
/** Registry updates of this process, chained per directory so concurrent activities do not lose entries. */
const updates = new Map<string, Promise<void>>();

function validateDrillId(drillId: string): void {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(drillId)) {
    throw new Error(`invalid drill id "${drillId}": use letters, digits, ".", "_" and "-"`);
  }
}

async function readRegistry(directory: string): Promise<Registry | undefined> {
  try {
    return JSON.parse(await readFile(path.join(directory, REGISTRY_FILE), 'utf8')) as Registry;
  } catch {
    return undefined;
  }
}

async function writeRegistry(directory: string, registry: Registry): Promise<void> {
  const temporary = path.join(directory, `${REGISTRY_FILE}.${process.pid}.tmp`);
  await writeFile(temporary, JSON.stringify(registry, null, 2) + '\n', { mode: 0o600 });
  await rename(temporary, path.join(directory, REGISTRY_FILE));
}

/** The scratch directory of one drill run on this host. */
export class Scratch {
  constructor(
    readonly drillId: string,
    readonly directory: string,
  ) {}

  /** Applies `change` to the registry, one change at a time. */
  update(change: (registry: Registry) => void): Promise<void> {
    const previous = updates.get(this.directory) ?? Promise.resolve();
    const next = previous.then(async () => {
      const registry = (await readRegistry(this.directory)) ?? newRegistry(this.drillId);
      change(registry);
      await writeRegistry(this.directory, registry);
    });
    updates.set(this.directory, next.catch(() => undefined));
    return next;
  }

  registerProcess(entry: RegisteredProcess): Promise<void> {
    return this.update((registry) => {
      registry.processes.push(entry);
    });
  }

  unregisterProcess(pid: number): Promise<void> {
    return this.update((registry) => {
      registry.processes = registry.processes.filter((entry) => entry.pid !== pid);
    });
  }

  registerPath(location: string): Promise<void> {
    return this.update((registry) => {
      if (!registry.paths.includes(location)) registry.paths.push(location);
    });
  }

  unregisterPath(location: string): Promise<void> {
    return this.update((registry) => {
      registry.paths = registry.paths.filter((entry) => entry !== location);
    });
  }
}

function newRegistry(drillId: string): Registry {
  return {
    format: 'opa-backup.drill-scratch',
    version: 1,
    drillId,
    hostname: hostname(),
    owner: { pid: process.pid, startTime: ownerStartTime },
    createdAt: new Date().toISOString(),
    processes: [],
    paths: [],
  };
}

/**
 * Opens the scratch directory of a drill, creating it with its registry, and
 * takes it over for this worker process. Mode 0711 lets the `postgres` user
 * reach a cluster directory inside it when the worker runs as root.
 */
export async function openScratch(drillId: string): Promise<Scratch> {
  validateDrillId(drillId);
  const root = drillRoot();
  await mkdir(root, { recursive: true, mode: 0o711 });
  await checkOwnDirectory(root);
  const directory = path.join(root, drillId);
  await mkdir(directory, { recursive: true, mode: 0o711 });
  await checkOwnDirectory(directory);
  if (process.getuid?.() === 0) {
    await chmod(root, 0o711);
    await chmod(directory, 0o711);
  }
  const scratch = new Scratch(drillId, directory);
  await scratch.update((registry) => {
    registry.hostname = hostname();
    registry.owner = { pid: process.pid, startTime: ownerStartTime };
  });
  return scratch;
}

/**
 * Rejects a directory that is a symbolic link or belongs to another user:
 * the default root sits in the shared temporary folder, where another user
 * could create it first.
 */
async function checkOwnDirectory(directory: string): Promise<void> {
  const info = await lstat(directory);
  const uid = process.getuid?.();
  if (!info.isDirectory() || (uid !== undefined && info.uid !== uid)) {
    throw new Error(`drill directory ${directory} is not a directory owned by this user; remove it or set OPA_BACKUP_DRILL_DIR to a private folder`);
  }
}

/** Kills the processes a registry lists and removes its paths and the directory itself. */
async function removeDrillDirectory(directory: string, registry: Registry | undefined): Promise<void> {
  for (const entry of registry?.processes ?? []) killGroup(entry);
  for (const location of registry?.paths ?? []) await rm(location, { recursive: true, force: true });
  await rm(directory, { recursive: true, force: true });
}

/** Stops what is left of a drill on this host and removes its scratch directory; used by the cleanup activity. */
export async function removeScratch(drillId: string): Promise<void> {
  validateDrillId(drillId);
  const directory = path.join(drillRoot(), drillId);
  await (updates.get(directory) ?? Promise.resolve());
  await removeDrillDirectory(directory, await readRegistry(directory));
  updates.delete(directory);
}

/**
 * Removes what drills of dead workers left on this host: their process
 * groups, their directories outside the root and their scratch directories.
 * Drills of live workers (this one included) are left alone. Returns the
 * drill ids it removed.
 */
export async function reapDrillLeftovers(): Promise<string[]> {
  const root = drillRoot();
  let names: string[];
  try {
    names = await readdir(root);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw error;
  }
  const removed: string[] = [];
  for (const name of names) {
    const directory = path.join(root, name);
    const info = await stat(directory).catch(() => undefined);
    if (!info?.isDirectory()) continue;
    const registry = await readRegistry(directory);
    if (!registry) {
      if (Date.now() - info.mtimeMs < ORPHAN_AGE_MS) continue;
    } else {
      // Another host may share the root (a network file system); its drills are its own.
      if (registry.hostname !== hostname()) continue;
      if (registry.owner.pid === process.pid || isAlive(registry.owner.pid, registry.owner.startTime)) continue;
    }
    await removeDrillDirectory(directory, registry);
    logger.warn(
      { drillId: name, processes: registry?.processes.map((entry) => `${entry.command}:${entry.pid}`) ?? [], paths: registry?.paths ?? [] },
      'removed the leftovers of a drill whose worker stopped',
    );
    removed.push(name);
  }
  return removed;
}

export interface DrillProcess {
  child: ChildProcess;
  logFile: string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Returns the last `bytes` of the process's output. */
  logTail(bytes?: number): string;
  /** Sends `signal` to the process group, then SIGKILL after `graceMs`, and waits for the exit. */
  stop(signal?: NodeJS.Signals, graceMs?: number): Promise<void>;
}

/**
 * Starts a command as the leader of its own process group, with stdout and
 * stderr in `logFile`, and registers it in the scratch registry before it
 * returns. Stop it with stop(); the registry entry is removed then.
 */
export async function startTracked(
  scratch: Scratch,
  command: string,
  args: string[],
  logFile: string,
  options: Pick<SpawnOptions, 'cwd' | 'env' | 'uid' | 'gid'> = {},
): Promise<DrillProcess> {
  const descriptor = openSync(logFile, 'a', 0o644);
  let child: ChildProcess;
  try {
    child = spawn(command, args, { ...options, stdio: ['ignore', descriptor, descriptor], detached: true });
  } finally {
    closeSync(descriptor);
  }
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', () => resolve({ code: null, signal: null }));
  });
  const spawnError = await new Promise<Error | undefined>((resolve) => {
    child.once('spawn', () => resolve(undefined));
    child.once('error', resolve);
  });
  if (spawnError) throw new Error(`cannot start ${command}: ${spawnError.message}`);
  const pid = child.pid!;
  await scratch.registerProcess({ pid, command: path.basename(command), startTime: processStartTime(pid) });

  let stopping: Promise<void> | undefined;
  return {
    child,
    logFile,
    exited,
    logTail(bytes = 2000) {
      try {
        const text = readFileSync(logFile, 'utf8');
        return text.slice(-bytes).trim();
      } catch {
        return '';
      }
    },
    stop(signal: NodeJS.Signals = 'SIGTERM', graceMs = 10_000) {
      stopping ??= (async () => {
        if (child.exitCode === null && child.signalCode === null) {
          try {
            process.kill(-pid, signal);
          } catch {
            // Already gone.
          }
          const timer = setTimeout(() => {
            try {
              process.kill(-pid, 'SIGKILL');
            } catch {
              // Already gone.
            }
          }, graceMs);
          await exited;
          clearTimeout(timer);
        }
        // Children that outlived the leader get no grace.
        try {
          process.kill(-pid, 'SIGKILL');
        } catch {
          // The group is empty.
        }
        await scratch.unregisterProcess(pid);
      })();
      return stopping;
    },
  };
}

/**
 * Runs a command to completion as a tracked process and returns its output
 * log. Rejects with the end of the log when it exits non-zero, and kills it
 * when `signal` aborts.
 */
export async function runTracked(
  scratch: Scratch,
  command: string,
  args: string[],
  logFile: string,
  options: Pick<SpawnOptions, 'cwd' | 'env' | 'uid' | 'gid'> & { signal?: AbortSignal } = {},
): Promise<string> {
  options.signal?.throwIfAborted();
  const started = await startTracked(scratch, command, args, logFile, options);
  const onAbort = (): void => void started.stop('SIGKILL');
  options.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    const { code, signal } = await started.exited;
    options.signal?.throwIfAborted();
    if (code !== 0) {
      const status = signal ? `was killed by ${signal}` : `exited with ${code}`;
      throw new Error(`${path.basename(command)} ${status}: ${started.logTail()}`);
    }
    return started.logTail(64 * 1024);
  } finally {
    options.signal?.removeEventListener('abort', onAbort);
    await started.stop('SIGKILL');
  }
}
