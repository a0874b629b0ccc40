"""From the runs to the tables: the summary, the significance tests, the theory beside the measurements."""
