"""One module per parallel strategy; each is a plain function ``apply_x(model, topo, cfg)``."""
