"""The wire layer: protocol v1 messages, ZeroMQ transport, endpoints, CURVE keys, the result stream."""
