// The activity that backs up a Redis source: an RDB snapshot over the
// replication protocol, or a keys-mode stream where the server refuses SYNC.
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import { FailureType } from '../../common/failures';
import { backupFolder, redisKey } from '../../common/layout';
import type { RedisFacts } from '../../common/manifest';
import type { Plan } from '../../common/plan';
import type { ArtifactReference } from '../../common/workflow-types';
import { artifactReference, heartbeatTimer } from '../backup';
import { activityLogger } from '../logging';
import { resolveSecret } from '../secrets';
import { openBlobStore } from '../storage';
import { dumpKeys, dumpRdb, RedisSyncRejectedError } from './dump';

export async function dumpRedisSource(input: { plan: Plan; source: string; backupId: string }): Promise<ArtifactReference> {
  const { plan, backupId } = input;
  const index = (plan.sources.redis ?? []).findIndex((source) => source.name === input.source);
  if (index < 0) {
    throw ApplicationFailure.create({
      type: FailureType.InvalidPlan,
      nonRetryable: true,
      message: `plan ${plan.name} has no Redis source named "${input.source}"`,
    });
  }
  const source = plan.sources.redis![index];
  const mode = source.mode ?? 'rdb';
  const context = Context.current();
  const log = activityLogger({ backupId, plan: plan.name, source: source.name, mode });
  const store = openBlobStore(plan.destination);
  const folder = backupFolder(plan.name, backupId);
  const key = redisKey(source.name, mode);
  const startedAt = new Date().toISOString();
  let bytes = 0;
  const stopHeartbeat = heartbeatTimer(() => ({ bytes }));
  log.info({ attempt: context.info.attempt }, 'Redis dump started');

  try {
    const options = {
      url: source.url,
      password: source.password ? resolveSecret(source.password, `sources.redis[${index}].password`) : undefined,
      source: source.name,
      store,
      key: `${folder}/${key}`,
      signal: context.cancellationSignal,
      onProgress: (stored: number) => {
        bytes = stored;
      },
    };
    let facts: RedisFacts;
    let result: { size: number; sha256: string };
    if (mode === 'rdb') {
      const rdb = await dumpRdb(options);
      result = rdb;
      facts = { mode, redisVersion: rdb.redisVersion, keyspace: rdb.keyspace };
    } else {
      const keys = await dumpKeys(options);
      result = keys;
      facts = { mode, redisVersion: keys.redisVersion, keyspace: keys.keyspace, records: keys.records, expiredSkipped: keys.expiredSkipped };
    }
    const kind = mode === 'rdb' ? 'redis-rdb' : 'redis-keys';
    const reference = await artifactReference({ store, folder, kind, source: source.name, key, stored: result, facts, startedAt });
    log.info({ key, size: result.size, sha256: result.sha256 }, 'Redis dump stored');
    return reference;
  } catch (error) {
    log.warn({ error: (error as Error).message, attempt: context.info.attempt }, 'Redis dump failed');
    if (error instanceof ApplicationFailure || (error as Error).name === 'AbortError') throw error;
    const message = (error as Error).message;
    if (error instanceof RedisSyncRejectedError) {
      throw ApplicationFailure.create({ type: FailureType.InvalidPlan, nonRetryable: true, message });
    }
    if (/WRONGPASS|NOAUTH|invalid password/i.test(message)) {
      throw ApplicationFailure.create({ type: FailureType.Unauthorized, nonRetryable: true, message });
    }
    throw ApplicationFailure.create({
      type: FailureType.SourceUnavailable,
      message: message.includes(source.name) ? message : `Redis source "${source.name}": ${message}`,
    });
  } finally {
    stopHeartbeat();
  }
}
