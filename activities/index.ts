// Every activity the worker registers.
export { loadPlan, snapshotOpaSource, sealBackup, describeDestination } from './backup';
export { listPostgresDatabases, dumpPostgres } from './postgres/step';
export { verifyBackup } from './verify';
export { dumpRedisSource, listRedisClusterMasters } from './redis/step';
export { fetchBundleSource } from './sources/bundle';
export { bundleGitSource } from './sources/git';
export { planRetention, findDrillTargets, deleteBackups, removeLeftovers } from './retention';
export {
  resolveDrillBackup,
  drillFetchArtifacts,
  drillOpa,
  drillPostgres,
  drillRedis,
  drillServedBundle,
  drillGit,
  writeDrillReport,
  cleanupDrill,
} from './drill/activities';
export { recordBackupMetrics, recordDrillMetrics } from './metrics';
export { checkOpaBundles, checkReplicaBackups, checkStoredBackups } from './health';
export { catchUpReplicas } from './replicas';
