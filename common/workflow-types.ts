// Inputs and results of workflows and activities. They travel through
// Temporal's history, so they hold names, keys and digests, never secrets
// or artifact bytes. Pure types: workflows import them.
import type { Plan } from './plan';
import type { ArtifactKind, SourceFailure } from './manifest';

/**
 * Input of backupWorkflow. Give exactly one of `plan` (the plan document
 * itself, as the CLI sends it) or `planFile` (a path the worker can read).
 */
export interface BackupWorkflowInput {
  plan?: Plan;
  planFile?: string;
}

/** Result of a source step: the artifact's key and the digests to check it. */
export interface ArtifactReference {
  kind: ArtifactKind;
  source: string;
  /** Artifact key relative to the backup folder. */
  key: string;
  size: number;
  sha256: string;
  /** Key of the facts document the step stored beside the artifact; sealBackup moves its content into the manifest. */
  factsKey: string;
  factsSha256: string;
  startedAt: string;
  completedAt: string;
}

export interface SnapshotOpaInput {
  plan: Plan;
  source: string;
  backupId: string;
}

export interface PostgresStepInput {
  plan: Plan;
  source: string;
  backupId: string;
  /** The database to dump; absent for the globals dump. */
  database?: string;
}

export interface SealBackupInput {
  plan: Plan;
  backupId: string;
  startedAt: string;
  workflow: { workflowId: string; runId: string };
  artifacts: ArtifactReference[];
  failures: SourceFailure[];
}

export interface SealBackupResult {
  manifestKey: string;
  manifestSha256: string;
  status: 'complete' | 'partial';
}

export type SourceState = 'pending' | 'running' | 'done' | 'failed';

export interface BackupProgress {
  backupId?: string;
  plan?: string;
  sources: Array<{ kind: 'opa' | 'postgres' | 'redis'; name: string; state: SourceState; error?: string }>;
  sealed: boolean;
}

export interface BackupWorkflowResult {
  backupId: string;
  plan: string;
  status: 'complete' | 'partial';
  /** Description of the blob store that contains the backup. */
  destination: string;
  manifestKey: string;
  manifestSha256: string;
  artifacts: Array<Pick<ArtifactReference, 'kind' | 'source' | 'key' | 'size' | 'sha256'>>;
  failures: SourceFailure[];
}
