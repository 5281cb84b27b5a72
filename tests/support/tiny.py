"""The tiny training settings the CPU tests use."""

# A tiny network with SSD300's topology and default boxes, so CPU tests stay fast.
TINY = {"width_multiplier": 0.125, "num_workers": 0, "batch_size": 4}
