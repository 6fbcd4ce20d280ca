"""One module per parallel strategy, each a plain function ``apply_x(model, <its mesh or devices>,
<its options>) -> model`` on PyTorch's own API (DDP, ``fully_shard``, ``parallelize_module``,
``torch.distributed.pipelining``, checkpoint wrappers). ``gpupar.parallelize`` composes them in
one fixed order; ``tied`` keeps tied weights tied through each of them."""
