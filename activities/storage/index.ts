import { ApplicationFailure } from '@temporalio/common';
import { FailureType } from '../../common/failures';
import { PRIMARY_DESTINATION, type Destination, type Plan } from '../../common/plan';
import type { BlobStore } from './blob-store';
import { LocalBlobStore } from './local';
import { ReplicatedBlobStore } from './replicated';
import { S3BlobStore } from './s3';

export * from './blob-store';
export { AllDestinationsFailedError, ReplicatedBlobStore } from './replicated';

/** Opens the blob store a plan's destination names. */
export function openBlobStore(destination: Destination): BlobStore {
  if (destination.local) return new LocalBlobStore(destination.local.path);
  if (destination.s3) return new S3BlobStore(destination.s3);
  throw new Error('the destination sets neither "local" nor "s3"');
}

/** Returns the plan's destination and replicas, each opened and named: "primary" first, then each replica. */
export function openDestinations(plan: Pick<Plan, 'destination' | 'replicas'>): Array<{ name: string; store: BlobStore }> {
  return [
    { name: PRIMARY_DESTINATION, store: openBlobStore(plan.destination) },
    ...(plan.replicas ?? []).map((replica) => ({ name: replica.name, store: openBlobStore(replica) })),
  ];
}

/** Opens the store that artifacts are written to: the destination alone, or it and every replica. */
export function openWriteStore(plan: Pick<Plan, 'destination' | 'replicas'>): BlobStore {
  return plan.replicas ? new ReplicatedBlobStore(openDestinations(plan)) : openBlobStore(plan.destination);
}

/**
 * Opens the store that backups are read from. With replicas, each object
 * comes from the first destination, in plan order, that has it, so a
 * backup stays readable while a destination is down or lacks an object.
 * NOTE: a damaged object in an earlier destination is still the one read,
 * even when a later destination has it intact.
 */
export function openReadStore(plan: Pick<Plan, 'destination' | 'replicas'>): BlobStore {
  return openWriteStore(plan);
}

/**
 * Opens the destination of the plan with this name: PRIMARY_DESTINATION
 * ("primary", the default) or a replica's name.
 */
export function openNamedDestination(plan: Pick<Plan, 'name' | 'destination' | 'replicas'>, name: string = PRIMARY_DESTINATION): BlobStore {
  if (name === PRIMARY_DESTINATION) return openBlobStore(plan.destination);
  const replica = (plan.replicas ?? []).find((candidate) => candidate.name === name);
  if (!replica) {
    const known = [PRIMARY_DESTINATION, ...(plan.replicas ?? []).map((candidate) => candidate.name)];
    throw ApplicationFailure.create({
      type: FailureType.InvalidPlan,
      nonRetryable: true,
      message: `plan ${plan.name} has no destination named "${name}"; its destinations are ${known.join(', ')}`,
    });
  }
  return openBlobStore(replica);
}
