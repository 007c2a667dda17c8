// Redis Cluster topology from CLUSTER NODES: which masters serve which hash
// slots. A cluster source is backed up one master at a time, each master in
// its own activity, with dumpRdb or dumpKeys against that master alone.
//
// CLUSTER NODES prints one line per node (Redis 7.0, "CLUSTER NODES" in the
// command reference):
//
//   <id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent> <pong-recv> <config-epoch> <link-state> <slot> ...
//
// where flags is a comma-separated list such as "myself,master" or
// "slave,fail", and each slot entry is "N", "N-M", or a bracketed migration
// entry such as "[93->-<id>]" that names no slot this node serves.
import { compareStrings } from '../../common/compare';
import type { RedisClusterNodeFacts } from '../../common/manifest';
import { openClient, parseRedisUrl, sourceLabel } from './dump';

/** Number of hash slots of every Redis Cluster. */
export const CLUSTER_SLOTS = 16384;

/** Flags that mark a node as unreachable or not yet part of the cluster. */
const UNUSABLE_FLAGS = new Set(['fail', 'fail?', 'handshake', 'noaddr']);

export interface ClusterNode {
  nodeId: string;
  host: string;
  port: number;
  flags: string[];
  /** Inclusive [first, last] slot ranges, in the order CLUSTER NODES lists them. */
  slots: Array<[number, number]>;
}

export interface ClusterMaster extends RedisClusterNodeFacts {
  host: string;
  port: number;
}

/**
 * Parses CLUSTER NODES output. A node that does not know its own address
 * yet prints ":PORT@CPORT" for itself, so an empty host is replaced with
 * `seedHost`, the host the output was read from.
 */
export function parseClusterNodes(text: string, seedHost: string): ClusterNode[] {
  const nodes: ClusterNode[] = [];
  for (const line of text.split('\n')) {
    const fields = line.trim().split(' ');
    if (fields.length < 8) continue;
    const [nodeId, addressField, flagsField] = fields;
    // "ip:port@cport" or "ip:port@cport,hostname"; an IPv6 ip contains colons itself.
    const address = addressField.split(',')[0].split('@')[0];
    const colon = address.lastIndexOf(':');
    const port = Number(address.slice(colon + 1));
    if (colon < 0 || !Number.isInteger(port)) throw new Error(`invalid address "${addressField}" in CLUSTER NODES line: ${line.trim()}`);
    const host = address.slice(0, colon) || seedHost;
    const slots: Array<[number, number]> = [];
    for (const entry of fields.slice(8)) {
      if (entry.startsWith('[')) continue;
      const [first, last = first] = entry.split('-').map(Number);
      if (!Number.isInteger(first) || !Number.isInteger(last)) throw new Error(`invalid slot entry "${entry}" in CLUSTER NODES line: ${line.trim()}`);
      slots.push([first, last]);
    }
    nodes.push({ nodeId, host, port, flags: flagsField.split(','), slots });
  }
  return nodes;
}

/** Formats slot numbers as ranges: [0, 1, 2, 7] -> "0-2, 7". */
function describeSlots(slots: number[]): string {
  const ranges: string[] = [];
  for (let index = 0; index < slots.length; ) {
    let end = index;
    while (end + 1 < slots.length && slots[end + 1] === slots[end] + 1) end += 1;
    ranges.push(slots[index] === slots[end] ? String(slots[index]) : `${slots[index]}-${slots[end]}`);
    index = end + 1;
  }
  return ranges.join(', ');
}

/**
 * Returns the live masters of a parsed cluster, sorted by address. Replicas
 * and failed nodes are skipped. Raises an error that names the uncovered
 * slots when a slot has no live master, because a backup of such a cluster
 * would silently miss the keys of those slots.
 */
export function liveMasters(nodes: ClusterNode[]): ClusterMaster[] {
  const masters = nodes.filter((node) => node.flags.includes('master') && !node.flags.some((flag) => UNUSABLE_FLAGS.has(flag)));
  const covered = new Uint8Array(CLUSTER_SLOTS);
  for (const master of masters) {
    for (const [first, last] of master.slots) covered.fill(1, first, last + 1);
  }
  const uncovered: number[] = [];
  for (let slot = 0; slot < CLUSTER_SLOTS; slot += 1) if (covered[slot] === 0) uncovered.push(slot);
  if (uncovered.length > 0) {
    throw new Error(
      `${uncovered.length} of ${CLUSTER_SLOTS} hash slots have no live master (slots ${describeSlots(uncovered)}); ` +
        'fix the cluster (CLUSTER INFO shows cluster_state) before backing it up',
    );
  }
  return masters
    .filter((master) => master.slots.length > 0)
    .map((master) => ({ nodeId: master.nodeId, host: master.host, port: master.port, address: `${master.host}:${master.port}`, slots: master.slots }))
    .sort((a, b) => compareStrings(a.host, b.host) || a.port - b.port);
}

/** Reads CLUSTER NODES from the node at `url`. */
async function readClusterNodes(url: string, password: string | undefined, source: string): Promise<ClusterNode[]> {
  const target = parseRedisUrl(url, password);
  const label = sourceLabel(source, target);
  const client = await openClient(target, label);
  try {
    const text = (await client.call('CLUSTER', 'NODES')) as string;
    return parseClusterNodes(text, target.host);
  } catch (error) {
    const message = (error as Error).message;
    if (/cluster support disabled/i.test(message)) {
      throw new ClusterNotEnabledError(`${label} is not a cluster node (${message}); remove "cluster: true" from the source or point url at a cluster node`);
    }
    throw new Error(`${label}: CLUSTER NODES failed: ${message}`);
  } finally {
    client.disconnect();
  }
}

/** Lists the live masters of the cluster that the seed node at `url` belongs to. */
export async function discoverClusterMasters(url: string, password: string | undefined, source: string): Promise<ClusterMaster[]> {
  const nodes = await readClusterNodes(url, password, source);
  try {
    return liveMasters(nodes);
  } catch (error) {
    throw new Error(`Redis Cluster source "${source}": ${(error as Error).message}`);
  }
}

/**
 * Reads the facts of the node at `url` from its own CLUSTER NODES line and
 * checks that it is still a master that serves slots: a failover after
 * discovery makes the list of masters stale.
 */
export async function readMasterFacts(url: string, password: string | undefined, source: string): Promise<RedisClusterNodeFacts> {
  const target = parseRedisUrl(url, password);
  const nodes = await readClusterNodes(url, password, source);
  const self = nodes.find((node) => node.flags.includes('myself'));
  if (!self) throw new Error(`${sourceLabel(source, target)}: CLUSTER NODES has no line flagged "myself"`);
  if (!self.flags.includes('master') || self.slots.length === 0) {
    throw new ClusterTopologyChangedError(
      `${sourceLabel(source, target)} is no longer a master that serves slots (flags ${self.flags.join(',')}), ` +
        'so the cluster changed after its masters were listed; run the backup again',
    );
  }
  return { nodeId: self.nodeId, address: target.address, slots: self.slots };
}

/** Error raised when a node listed as a master is no longer one. A retry of the same activity cannot fix it. */
export class ClusterTopologyChangedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ClusterTopologyChangedError';
  }
}

/** Error raised when a source marked `cluster: true` is not a cluster node. */
export class ClusterNotEnabledError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ClusterNotEnabledError';
  }
}
