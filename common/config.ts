// Connection settings shared by the worker and the CLI, from the environment.

/** Task queue that the worker polls and the CLI starts workflows on. */
export const DEFAULT_TASK_QUEUE = 'opa-backup';

export interface TemporalSettings {
  /** host:port of the Temporal frontend. @default "localhost:7233" */
  address: string;
  /** @default "default" */
  namespace: string;
  /** @default "opa-backup" */
  taskQueue: string;
}

export function temporalSettings(environment: NodeJS.ProcessEnv = process.env): TemporalSettings {
  return {
    address: environment.TEMPORAL_ADDRESS || 'localhost:7233',
    namespace: environment.TEMPORAL_NAMESPACE || 'default',
    taskQueue: environment.OPA_BACKUP_TASK_QUEUE || DEFAULT_TASK_QUEUE,
  };
}
