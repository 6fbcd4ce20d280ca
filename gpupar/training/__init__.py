"""Training: its records (state), its recipe (loss, optimizer, schedule, autocast), the step,
the NaN/Inf guard, the CUDA-graph capture and the loop that runs them."""
