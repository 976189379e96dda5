"""stemlive.simulators: a physically grounded simulated STEM instrument that knows its ground truth."""
