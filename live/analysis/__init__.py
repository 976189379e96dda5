"""Pure analysis functions over numpy arrays (no Qt, ZeroMQ, h5py or Swift imports).

The same functions run live in the pipeline service, on replay and in batch.
"""
