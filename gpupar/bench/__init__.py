"""`gpupar bench`: the same training workload timed across strategies and world sizes.

driver.py runs the combinations and derives the figures, worker.py is one rank of one
combination, flops.py counts model FLOPs and peaks for MFU, peers.py runs the same DDP
workload through other frameworks, report.py writes the markdown table and the plots.
"""
