"""Model: loading a base model and its adapter (engines), decoder internals (modeling), chat tokenisation, the loss
maths and chunked token scores."""
