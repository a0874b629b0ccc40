"""Training: the lecture's networks, the two engines (the lecture's loop and the batched one), the statistics
recorded through hooks, and one training job."""
