// Every activity the worker registers.
export { loadPlan, snapshotOpaSource, sealBackup, describeDestination } from './backup';
export { listPostgresDatabases, dumpPostgres } from './postgres/step';
export { dumpRedisSource } from './redis/step';
