"""What the supervisor (pipeline/) and the shard workers (shards/) both need: routing and logs.

Neither side imports the other's modules for these, so the folder boundary stays the process
boundary: shards/ never imports pipeline/."""
