// Inputs, results and progress of restoreDrillWorkflow and its activities.
// They travel through Temporal's history, so they hold names, keys, digests
// and check outcomes, never artifact bytes. Pure types: workflows import them.
import type { Plan } from '../../common/plan';

/**
 * Input of restoreDrillWorkflow. Give exactly one of `plan` or `planFile`,
 * as for backupWorkflow. `backup` is a backup id, "latest" (the newest
 * backup with a manifest) or "random" (a random backup of the last
 * `randomWithinDays` days, 7 by default).
 */
export interface DrillWorkflowInput {
  planFile?: string;
  plan?: Plan;
  backup: 'latest' | 'random' | string;
  randomWithinDays?: number;
}

export type CheckState = 'pending' | 'running' | 'passed' | 'failed';

/** One verification of a drill: its name ("opa-data"), what it verified ("opa/edge.tar.gz") and its outcome. */
export interface DrillCheck {
  name: string;
  object: string;
  state: CheckState;
  message?: string;
  /** Seconds the check took, once it ended. */
  durationSeconds?: number;
}

/** The result of a check as an activity returns it. */
export interface CheckResult {
  name: string;
  object: string;
  outcome: 'passed' | 'failed';
  message: string;
  durationSeconds: number;
}

/** One restore step of a drill and the checks it runs. A PostgreSQL step restores all of a source's artifacts into one cluster. */
export interface DrillStep {
  kind: 'opa' | 'postgres' | 'redis' | 'bundle' | 'git';
  source: string;
  /** Keys of the step's artifacts, relative to the backup folder. */
  keys: string[];
  checks: Array<{ name: string; object: string }>;
}

export interface DrillTarget {
  plan: string;
  backupId: string;
  /** SHA-256 of manifest.json; each activity checks the manifest it reads against it. */
  manifestSha256: string;
  steps: DrillStep[];
  /** Keys of every artifact, for the digest checks. */
  artifactKeys: string[];
}

export interface DrillActivityInput {
  plan: Plan;
  backupId: string;
  manifestSha256: string;
  /** Identifies the drill's scratch directory: one per workflow run. */
  drillId: string;
}

export interface DrillProgress {
  plan?: string;
  backupId?: string;
  checks: DrillCheck[];
  outcome?: 'passed' | 'failed';
  reportKey?: string;
}

export interface DrillReport {
  format: 'opa-backup.drill-report';
  version: 1;
  plan: string;
  backupId: string;
  workflow: { workflowId: string; runId: string };
  startedAt: string;
  completedAt: string;
  outcome: 'passed' | 'failed';
  /** Seconds from the drill's start to the end of the last restore step that passed; absent when none passed. */
  rtoSeconds?: number;
  checks: Array<{ name: string; object: string; outcome: 'passed' | 'failed'; message: string; durationSeconds: number }>;
}

export interface DrillWorkflowResult {
  plan: string;
  backupId: string;
  outcome: 'passed' | 'failed';
  rtoSeconds?: number;
  reportKey: string;
  /** Description of the blob store that contains the report. */
  destination: string;
  checks: DrillReport['checks'];
}
