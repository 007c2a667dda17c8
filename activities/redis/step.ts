// The activities that back up a Redis source: an RDB snapshot over the
// replication protocol, or a keys-mode stream where the server refuses SYNC.
// A cluster source lists its masters in one short activity, then dumps each
// master in its own activity.
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import { FailureType } from '../../common/failures';
import { backupFolder, redisClusterNodeKey, redisKey } from '../../common/layout';
import type { RedisFacts } from '../../common/manifest';
import type { Plan, RedisSource } from '../../common/plan';
import type { ArtifactReference } from '../../common/workflow-types';
import { artifactReference, heartbeatTimer } from '../backup';
import { activityLogger } from '../logging';
import { resolveSecret } from '../secrets';
import { openArtifactStore } from '../artifacts';
import { ClusterNotEnabledError, ClusterTopologyChangedError, discoverClusterMasters, readMasterFacts, type ClusterMaster } from './cluster';
import { dumpKeys, dumpRdb, RedisSyncRejectedError } from './dump';

/** Address of one master of a cluster source, from listRedisClusterMasters. */
export interface RedisNodeAddress {
  host: string;
  port: number;
}

function findSource(plan: Plan, name: string): { source: RedisSource; index: number } {
  const index = (plan.sources.redis ?? []).findIndex((source) => source.name === name);
  if (index < 0) {
    throw ApplicationFailure.create({
      type: FailureType.InvalidPlan,
      nonRetryable: true,
      message: `plan ${plan.name} has no Redis source named "${name}"`,
    });
  }
  return { source: plan.sources.redis![index], index };
}

function sourcePassword(source: RedisSource, index: number): string | undefined {
  return source.password ? resolveSecret(source.password, `sources.redis[${index}].password`) : undefined;
}

/** Returns the source's URL with its host and port replaced by `node`'s, keeping the user name. */
function nodeUrl(url: string, node: RedisNodeAddress): string {
  const parsed = new URL(url);
  parsed.hostname = node.host.includes(':') ? `[${node.host}]` : node.host;
  parsed.port = String(node.port);
  return parsed.toString();
}

/** Lists the live masters of a cluster source, through its seed node. */
export async function listRedisClusterMasters(input: { plan: Plan; source: string }): Promise<ClusterMaster[]> {
  const { source, index } = findSource(input.plan, input.source);
  const log = activityLogger({ plan: input.plan.name, source: source.name });
  try {
    const masters = await discoverClusterMasters(source.url, sourcePassword(source, index), source.name);
    log.info({ masters: masters.map((master) => master.address) }, 'Redis Cluster masters listed');
    return masters;
  } catch (error) {
    log.warn({ error: (error as Error).message }, 'listing Redis Cluster masters failed');
    throw redisFailure(source, error);
  }
}

/** Turns a dump or discovery error into a Temporal failure: bad credentials and rejected SYNC cannot be fixed by a retry. */
function redisFailure(source: RedisSource, error: unknown): Error {
  if (error instanceof ApplicationFailure || (error as Error).name === 'AbortError') return error as Error;
  const message = (error as Error).message;
  if (error instanceof RedisSyncRejectedError || error instanceof ClusterNotEnabledError) {
    return ApplicationFailure.create({ type: FailureType.InvalidPlan, nonRetryable: true, message });
  }
  if (error instanceof ClusterTopologyChangedError) {
    return ApplicationFailure.create({ type: FailureType.SourceUnavailable, nonRetryable: true, message });
  }
  if (/WRONGPASS|NOAUTH|invalid password/i.test(message)) {
    return ApplicationFailure.create({ type: FailureType.Unauthorized, nonRetryable: true, message });
  }
  return ApplicationFailure.create({
    type: FailureType.SourceUnavailable,
    message: message.includes(source.name) ? message : `Redis source "${source.name}": ${message}`,
  });
}

/** Dumps one Redis server, or with `node` one master of a cluster source, into the blob store. */
export async function dumpRedisSource(input: { plan: Plan; source: string; backupId: string; node?: RedisNodeAddress }): Promise<ArtifactReference> {
  const { plan, backupId, node } = input;
  const { source, index } = findSource(plan, input.source);
  const mode = source.mode ?? 'rdb';
  const context = Context.current();
  const log = activityLogger({ backupId, plan: plan.name, source: source.name, mode, ...(node ? { node: `${node.host}:${node.port}` } : {}) });
  const store = openArtifactStore(plan, mode === 'rdb' ? 'redis-rdb' : 'redis-keys');
  const folder = backupFolder(plan.name, backupId);
  const key = node ? redisClusterNodeKey(source.name, node.host, node.port, mode) : redisKey(source.name, mode);
  const url = node ? nodeUrl(source.url, node) : source.url;
  const startedAt = new Date().toISOString();
  let bytes = 0;
  const stopHeartbeat = heartbeatTimer(() => ({ bytes }));
  log.info({ attempt: context.info.attempt }, 'Redis dump started');

  try {
    const password = sourcePassword(source, index);
    const cluster = node ? await readMasterFacts(url, password, source.name) : undefined;
    const options = {
      url,
      password,
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
      facts = { mode, redisVersion: rdb.redisVersion, keyspace: rdb.keyspace, ...(cluster ? { cluster } : {}) };
    } else {
      const keys = await dumpKeys(options);
      result = keys;
      facts = {
        mode,
        redisVersion: keys.redisVersion,
        keyspace: keys.keyspace,
        records: keys.records,
        expiredSkipped: keys.expiredSkipped,
        ...(cluster ? { cluster } : {}),
      };
    }
    const kind = mode === 'rdb' ? 'redis-rdb' : 'redis-keys';
    const reference = await artifactReference({ store, folder, kind, source: source.name, key, stored: result, facts, startedAt });
    log.info({ key, size: result.size, sha256: result.sha256 }, 'Redis dump stored');
    return reference;
  } catch (error) {
    log.warn({ error: (error as Error).message, attempt: context.info.attempt }, 'Redis dump failed');
    throw redisFailure(source, error);
  } finally {
    stopHeartbeat();
  }
}
