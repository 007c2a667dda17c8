package nums

# A rule under the same package as the numbers, so the snapshot reads them
# through the rule-replacing query rather than a plain subtree read.
over_limit if data.limits.max > data.nums.big
