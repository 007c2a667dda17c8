// verifyBackupWorkflow: checks a stored backup on a worker, so schedules and
// `temporal workflow start` can run the same checks as `opa-backup verify`.
// The report, not a failure, carries any damage it finds.
import { ApplicationFailure, proxyActivities } from '@temporalio/workflow';
import type * as activities from '../activities';
import { NON_RETRYABLE_FAILURES } from '../common/failures';
import type { BackupWorkflowInput } from '../common/workflow-types';

const { loadPlan } = proxyActivities<typeof activities>({
  startToCloseTimeout: '1m',
  retry: { initialInterval: '1s', maximumAttempts: 5, nonRetryableErrorTypes: [...NON_RETRYABLE_FAILURES] },
});

const { verifyBackup } = proxyActivities<typeof activities>({
  startToCloseTimeout: '6h',
  heartbeatTimeout: '1m',
  retry: { initialInterval: '5s', maximumAttempts: 3, nonRetryableErrorTypes: [...NON_RETRYABLE_FAILURES] },
});

/** Input: the plan (or plan file) and the backup id to check. */
export interface VerifyBackupWorkflowInput extends BackupWorkflowInput {
  backupId: string;
}

export async function verifyBackupWorkflow(input: VerifyBackupWorkflowInput): Promise<Awaited<ReturnType<typeof verifyBackup>>> {
  if (!input?.backupId) {
    throw ApplicationFailure.create({ type: 'InvalidInput', nonRetryable: true, message: 'missing "backupId": the id of the backup to verify, as `opa-backup list` prints it' });
  }
  const plan = await loadPlan(input);
  return verifyBackup({ plan, backupId: input.backupId });
}
