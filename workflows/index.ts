// Every workflow the worker registers. The worker bundles this file.
export { backupWorkflow, backupProgressQuery } from './backup';
