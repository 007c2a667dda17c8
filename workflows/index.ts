// Every workflow the worker registers. The worker bundles this file.
export { backupWorkflow, backupProgressQuery } from './backup';
export { retentionWorkflow } from './retention';
export { scheduledBackupWorkflow, scheduledRetentionWorkflow } from './scheduled';
export { restoreDrillWorkflow, drillProgressQuery, drillTargetQuery } from './drill';
export { healthWorkflow } from './health';
export { verifyBackupWorkflow } from './verify';
