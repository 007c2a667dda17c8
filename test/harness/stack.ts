// A Temporal dev server and an opa-backup worker for end-to-end tests.
import { randomBytes } from 'node:crypto';
import type { Client } from '@temporalio/client';
import type { Plan } from '../../common/plan';
import type { BackupWorkflowResult } from '../../common/workflow-types';
import type { ManagedProcess } from './process';
import { startTemporal, type TemporalServer } from './temporal';
import { startWorker } from './worker';

export interface Stack {
  temporal: TemporalServer;
  client: Client;
  taskQueue: string;
  worker: ManagedProcess;
  /** Starts another worker on the same task queue, such as after killing the first. */
  restartWorker(name: string, env?: NodeJS.ProcessEnv): Promise<ManagedProcess>;
  backup(plan: Plan, workflowId?: string): Promise<BackupWorkflowResult>;
  stop(): Promise<void>;
}

export async function startStack(name: string, env: NodeJS.ProcessEnv = {}): Promise<Stack> {
  const temporal = await startTemporal(`${name}-temporal`);
  const taskQueue = `opa-backup-${name}-${randomBytes(3).toString('hex')}`;
  const workers: ManagedProcess[] = [];
  try {
    workers.push(await startWorker(`${name}-worker`, { address: temporal.address, taskQueue, env }));
  } catch (error) {
    await temporal.stop();
    throw error;
  }
  const client = await temporal.client();
  const stack: Stack = {
    temporal,
    client,
    taskQueue,
    get worker() {
      return workers[workers.length - 1];
    },
    async restartWorker(workerName, workerEnv = env) {
      const worker = await startWorker(workerName, { address: temporal.address, taskQueue, env: workerEnv });
      workers.push(worker);
      return worker;
    },
    backup(plan, workflowId = `backup-${plan.name}-${randomBytes(4).toString('hex')}`) {
      return client.workflow.execute('backupWorkflow', { taskQueue, workflowId, args: [{ plan }] });
    },
    async stop() {
      for (const worker of workers) await worker.stop('SIGTERM');
      await temporal.stop();
    },
  };
  return stack;
}
