// Inputs and results of workflows and activities. They travel through
// Temporal's history, so they hold names, keys and digests, never secrets
// or artifact bytes. Pure types: workflows import them.
import type { Plan } from './plan';
import type { ArtifactEncoding, ArtifactKind, DestinationState, Digest, SourceFailure } from './manifest';

/**
 * Input of backupWorkflow. Give exactly one of `plan` (the plan document
 * itself, as the CLI sends it) or `planFile` (a path the worker can read).
 */
export interface BackupWorkflowInput {
  plan?: Plan;
  planFile?: string;
  /** Runs a restore drill of the new backup as a child workflow once it is sealed. */
  drillAfter?: boolean;
}

/** Result of a source step: the artifact's key and the digests to check it. */
export interface ArtifactReference extends ArtifactEncoding {
  kind: ArtifactKind;
  source: string;
  /** Artifact key relative to the backup folder. */
  key: string;
  /** Size and SHA-256 of the stored object. */
  size: number;
  sha256: string;
  /** Size and SHA-256 of the step's output before compression and encryption. */
  plaintext: Digest;
  /** Replicated plans: destinations that failed to store the artifact, with their errors. */
  failedDestinations?: Record<string, string>;
  /** Key of the facts document the step stored beside the artifact; sealBackup moves its content into the manifest. */
  factsKey: string;
  factsSha256: string;
  /** Backup id of the earlier backup whose folder contains the bytes, when the step reused them unchanged. */
  storedIn?: string;
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
  /** Plans with replicas: the state of each destination. */
  destinations?: DestinationState[];
  /** The input's source failures and any destination that did not receive the backup. */
  failures: SourceFailure[];
}

export type SourceState = 'pending' | 'running' | 'done' | 'failed';

export interface BackupProgress {
  backupId?: string;
  plan?: string;
  sources: Array<{ kind: 'opa' | 'postgres' | 'redis' | 'bundle' | 'git'; name: string; state: SourceState; error?: string }>;
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
  /** Plans with replicas: each destination and whether it contains the backup. */
  destinations?: DestinationState[];
  /**
   * Plans with replicas: earlier backups copied to a replica that had missed
   * them, and why a replica's catch-up stopped. Only replicas with either.
   */
  caughtUp?: Array<{ name: string; copied: string[]; damaged?: Array<{ backupId: string; reason: string }>; error?: string }>;
  /** Outcome of the restore drill that `drillAfter` requested; `error` gives the reason a drill could not run. */
  drill?: { outcome: 'passed' | 'failed'; reportKey?: string; error?: string };
}
