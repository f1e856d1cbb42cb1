"""The ratio search (the paper's Algorithm 1): the simulated-annealing loop, near-free thresholds for
nearby ratios, the resident-model runner that scores candidates, and the trace plot."""
