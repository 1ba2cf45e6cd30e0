"""A trained run, evaluated as the paper does: load_trained (a model from its run id or checkpoint) and
the evaluate command's importance-weighted NLL, sample grids and KL per group, sharded over Ray workers."""
