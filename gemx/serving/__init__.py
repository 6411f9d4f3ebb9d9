"""Serving many streams on Triton Inference Server: the model repository, the stateful stream model,
a local server launcher, a stream client and a load test. Triton's client and server are the `serve` extra."""
