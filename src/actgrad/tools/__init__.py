"""Tools beside the workflow: the benchmark and its peers, the TensorBoard export."""
