"""Studies: a study spec expanded into a graph of runs, its executors (local, Ray, Slurm), node status, the results
index and the cost model."""
