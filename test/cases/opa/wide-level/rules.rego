package bulk

# A rule beside 300 base keys: the snapshot reads this level with one
# rule-replacing query instead of 300 plain reads.
last := data.bulk.k299.n
