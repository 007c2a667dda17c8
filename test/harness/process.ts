// Starts server processes for tests, with their output in a log file, and
// stops them (the whole process group) when the test ends.
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { mkdirSync, openSync, readFileSync, closeSync } from 'node:fs';
import path from 'node:path';
import { repositoryRoot } from './tools';

export const runsDirectory = path.join(repositoryRoot, '.test-runs');

/** Process groups still running, killed when the test process exits so no server outlives its test. */
const running = new Set<number>();

function killRunning(): void {
  for (const pid of running) {
    try {
      process.kill(-pid, 'SIGKILL');
    } catch {
      // Already gone.
    }
  }
  running.clear();
}

process.once('exit', killRunning);
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    killRunning();
    process.exit(130);
  });
}

export interface ManagedProcess {
  child: ChildProcess;
  logFile: string;
  /** The log so far. */
  log(): string;
  /** Sends `signal` to the process group and waits for the process to exit. */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<void>;
  exited: Promise<number | null>;
}

/** Starts `command` in its own process group, writing stdout and stderr to `.test-runs/<name>.log`. */
export function startProcess(
  name: string,
  command: string,
  args: string[],
  options: SpawnOptions & { logDirectory?: string } = {},
): ManagedProcess {
  const directory = options.logDirectory ?? runsDirectory;
  mkdirSync(directory, { recursive: true });
  const logFile = path.join(directory, `${name}.log`);
  const descriptor = openSync(logFile, 'w');
  const child = spawn(command, args, { ...options, stdio: ['ignore', descriptor, descriptor], detached: true });
  closeSync(descriptor);
  if (child.pid !== undefined) running.add(child.pid);
  const exited = new Promise<number | null>((resolve) => {
    child.once('exit', (code) => {
      if (child.pid !== undefined) running.delete(child.pid);
      resolve(code);
    });
    child.once('error', () => resolve(null));
  });
  const managed: ManagedProcess = {
    child,
    logFile,
    log: () => readFileSync(logFile, 'utf8'),
    exited,
    async stop(signal: NodeJS.Signals = 'SIGTERM', timeoutMs = 15_000) {
      if (child.exitCode !== null || child.signalCode !== null) return;
      try {
        process.kill(-child.pid!, signal);
      } catch {
        return;
      }
      const timer = setTimeout(() => {
        try {
          process.kill(-child.pid!, 'SIGKILL');
        } catch {
          // Already gone.
        }
      }, timeoutMs);
      await exited;
      clearTimeout(timer);
    },
  };
  return managed;
}
