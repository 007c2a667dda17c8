// Starts the opa-backup worker as its own process, as operators run it.
import path from 'node:path';
import { startProcess, type ManagedProcess } from './process';
import { repositoryRoot } from './tools';

export interface WorkerOptions {
  address: string;
  taskQueue: string;
  env?: NodeJS.ProcessEnv;
}

/** Starts a worker and waits for its "worker started" log line. */
export async function startWorker(name: string, options: WorkerOptions): Promise<ManagedProcess> {
  const worker = startProcess(name, process.execPath, [path.join(repositoryRoot, 'dist', 'worker', 'main.js')], {
    cwd: repositoryRoot,
    env: {
      ...process.env,
      TEMPORAL_ADDRESS: options.address,
      OPA_BACKUP_TASK_QUEUE: options.taskQueue,
      OPA_BACKUP_SHUTDOWN_GRACE: '2s',
      ...(options.env ?? {}),
    },
  });
  const deadline = Date.now() + 60_000;
  while (!worker.log().includes('"worker started"')) {
    if (worker.child.exitCode !== null) throw new Error(`worker exited with ${worker.child.exitCode}:\n${worker.log()}`);
    if (Date.now() > deadline) throw new Error(`worker did not start within 60 s:\n${worker.log()}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return worker;
}
